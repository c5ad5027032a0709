"""One job, however it is started: the command line and the Python API spell a job's options the same
(pipeline/spec.py), so a job begun with one is resumed, not refused, by the other."""

from __future__ import annotations

from click.testing import CliRunner

from pipeline import Translator
from pipeline.cli import main
from pipeline.spec import LoadSpec

SENTENCES = ["金利が上がると、借り入れの費用が高くなります。", "円安は輸出品を海外で安くします。", "これはペンです。"]


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_a_translate_job_begun_on_the_command_line_is_the_same_job_in_python(tiny_ja_en_dir, tmp_path):
    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("\n".join(SENTENCES * 3) + "\n", encoding="utf-8")
    begun = run_cli("translate", str(source), "--output", str(out), "--to", "en", "--ja-en", str(tiny_ja_en_dir),
                    "--device", "cpu", "--mt-backend", "transformers", "--quiet")
    assert begun.exit_code == 0, begun.output
    written = out.read_bytes()

    translator = Translator.from_pretrained(str(tiny_ja_en_dir), device="cpu", backend="transformers")
    summary = translator.translate_file(source, out, quiet=True)  # a JobError here: "other options"
    assert out.read_bytes() == written  # finished already: nothing translated twice
    assert "9 rows" in summary.describe()


def test_an_ask_job_begun_on_the_command_line_is_the_same_job_in_python(qa, model_args, tmp_path):
    source, out = tmp_path / "questions.txt", tmp_path / "answers.jsonl"
    source.write_text("What is a bond?\n金利とは何ですか？\n", encoding="utf-8")
    begun = run_cli("ask", "--batch", str(source), "--output", str(out), *model_args, "--device", "cpu",
                    "--engine", "transformers", "--mt-backend", "transformers", "--beams", "1",
                    "--max-new-tokens", "8", "--quiet")
    assert begun.exit_code == 0, begun.output
    written = out.read_bytes()
    from pipeline import GenerationSettings

    summary = qa.ask_file(source, out, settings=GenerationSettings(max_new_tokens=8), quiet=True)
    assert out.read_bytes() == written
    assert "2 rows" in summary.describe()


def test_the_fingerprint_names_what_was_asked_for_not_what_the_machine_chose():
    spec = LoadSpec.resolve("phi", "ja-en", "en-ja", device="cuda", dtype=None, beams=None)
    assert spec.fingerprint("ask") == {"models": {"llm": "phi", "ja_en": "ja-en", "en_ja": "en-ja"},
                                       "dtype": "auto", "engine": "auto", "mt_backend": "auto", "beams": None}
    assert spec.fingerprint("translate", "ja")["model"] == "en-ja"
    assert LoadSpec.resolve(base="base-dir").fingerprint("ask")["base"] == "base-dir"
