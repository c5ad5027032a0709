"""What the command says besides its answer: help, --quiet, status lines and notes."""

from __future__ import annotations

import json

import pytest

from pipeline import quiet
from pipeline.qa import QAResult
from cli_run import run_cli  # tests/cli_run.py


def test_bare_command_prints_the_whole_help_and_exits_0():
    proc = run_cli()
    out = proc.stdout.decode()
    assert proc.returncode == 0 and proc.stderr == b""
    assert out.startswith("Usage:") and len(out.splitlines()) > 10
    assert "ask" in out and "translate" in out and "BILINGUAL_QA_LLM" in out


@pytest.mark.parametrize("command", ["ask", "compare", "translate"])
def test_each_command_help_names_the_environment_variables(command):
    out = " ".join(run_cli(command, "--help").stdout.decode().split())  # help wraps lines
    assert "BILINGUAL_QA_JA_EN" in out and "BILINGUAL_QA_EN_JA" in out and "XDG_CACHE_HOME" in out
    if command == "ask":
        assert "env var: BILINGUAL_QA_LLM" in out


def test_help_shows_the_translation_defaults_and_every_environment_variable():
    out = " ".join(run_cli("ask", "--help").stdout.decode().split()).replace("- ", "-")  # help wraps lines
    assert "[default: Helsinki-NLP/opus-mt-ja-en]" in out and "[default: staka/fugumt-en-ja]" in out
    top = run_cli("--help").stdout.decode()
    assert "BILINGUAL_QA_BASE" in top and "BILINGUAL_QA_API_KEY" in top


@pytest.mark.parametrize("backend,said", [("transformers", "(transformers, float32)"), ("auto", "(CTranslate2 int8)")])
def test_a_translators_loading_line_names_the_backend_it_runs_on(backend, said, tiny_ja_en_dir, tmp_path):
    if backend == "auto":
        pytest.importorskip("ctranslate2")  # auto on the CPU is CTranslate2 where installed
    source = tmp_path / "in.txt"
    source.write_text("金利が上がります。\n", encoding="utf-8")
    proc = run_cli("translate", str(source), "-o", str(tmp_path / "out.txt"), "--to", "en", "--ja-en",
                   str(tiny_ja_en_dir), "--device", "cpu", "--beams", "1", "--mt-backend", backend,
                   env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr.decode()
    [line] = [line for line in proc.stderr.decode().splitlines() if line.startswith("bilingual-qa: loading ")]
    assert line.endswith(f"on cpu {said}")


def test_doctor_reports_peft_which_loads_lora_adapters():
    proc = run_cli("doctor", "--format", "json")
    assert proc.returncode == 0
    versions = json.loads(proc.stdout)["versions"]
    assert versions["peft"] and versions["peft"][0].isdigit()


def test_quiet_ask_prints_only_the_answer(model_args):
    proc = run_cli("ask", "金利とは？", *model_args, "--max-new-tokens", "6", "--beams", "1", "--quiet")
    assert proc.returncode == 0
    assert proc.stderr == b""  # no loading line, no library bar or warning
    assert "### ---" in proc.stdout.decode()


def test_quiet_compare_prints_only_the_answers(model_args, tiny_phi2_dir):
    rest = [a for a in model_args if a not in ("--llm", str(tiny_phi2_dir))]
    proc = run_cli("compare", "What is a bond?", "--llm", str(tiny_phi2_dir), "--llm", str(tiny_phi2_dir), *rest,
                   "--max-new-tokens", "4", "--beams", "1", "--format", "json", "-q")
    assert proc.returncode == 0 and proc.stderr == b""
    assert len(json.loads(proc.stdout)) == 2


def test_without_quiet_loading_lines_are_whole_lines_and_no_bar_off_a_terminal(model_args):
    proc = run_cli("ask", "What is a bond?", *model_args, "--max-new-tokens", "4", "--beams", "1")
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert "\r" not in stderr and "Loading weights" not in stderr
    assert all(line.startswith("bilingual-qa: ") for line in stderr.splitlines()), stderr


def test_transformers_fallback_note_prints_once_for_both_translators(tiny_ja_en_dir, tiny_en_ja_dir, monkeypatch, capsys):
    from pipeline.mt import ctranslate2 as ct2
    from pipeline.mt.translator import Translator

    monkeypatch.setattr(ct2, "ctranslate2_available", lambda: False)
    monkeypatch.setattr(quiet, "_shown_once", set())
    monkeypatch.delenv(quiet.QUIET_ENV, raising=False)
    for directory, target in ((tiny_ja_en_dir, "en"), (tiny_en_ja_dir, "ja")):
        Translator.from_pretrained(str(directory), device="cpu", backend="auto", target_lang=target)
    notes = [line for line in capsys.readouterr().err.splitlines() if "note: translating with transformers" in line]
    assert len(notes) == 1


def test_first_ctranslate2_conversion_says_where_it_writes(tiny_ja_en_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("ctranslate2")
    from pipeline.mt.ctranslate2 import converted_model_dir

    monkeypatch.delenv(quiet.QUIET_ENV, raising=False)
    with quiet.quiet_libraries(False):  # as every command runs: stderr is no terminal, so no bars
        target = converted_model_dir(tiny_ja_en_dir, cache_root=tmp_path)
    first = capsys.readouterr().err
    assert "converting" in first and str(target) in first and len(first.strip().splitlines()) == 1
    converted_model_dir(tiny_ja_en_dir, cache_root=tmp_path)
    assert "converting" not in capsys.readouterr().err  # reused, silently


def test_control_characters_a_model_writes_never_reach_the_terminal():
    result = QAResult("en", "What?", "何？", "red \x1b[31mtext\x07\r", "赤\x1b[0m", "eos", {"llm": "m"})
    for fmt in ("text", "markdown"):
        shown = result.render(fmt)
        assert "\x1b" not in shown and "\x07" not in shown and "\r" not in shown
        assert "red [31mtext" in shown
    assert json.loads(result.render("json"))["answer_en"] == "red \x1b[31mtext\x07\r"
