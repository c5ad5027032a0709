"""The translation memory: a sentence is translated once per context, in one call, one job, or
across jobs and processes sharing a `--memory` file; other contexts never share its entries."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pipeline import Translator
from pipeline.cli import main
from pipeline.errors import MemoryFileError
from pipeline.mt.memory import InProcessStore, SQLiteStore

ROWS = ["金利が上がります。円安は輸出に有利です。", "金利が上がります。", "", "東京の株式市場は午後に少し下がりました。",
        "円安は輸出に有利です。金利が上がります。", "これはペンです。"]
DISTINCT_SENTENCES = 4


class CountingBackend:
    """The real backend, counting the source rows it decodes."""

    def __init__(self, backend):
        self.backend = backend
        self.name = backend.name
        self.rows = 0

    def generate(self, batch, max_new_tokens, num_beams):
        self.rows += len(batch)
        return self.backend.generate(batch, max_new_tokens, num_beams)


def counting(translator: Translator) -> Translator:
    translator.backend = CountingBackend(translator.backend)
    return translator


def load(model_dir, memory=None, beams: int = 1, **kwargs) -> Translator:
    return counting(Translator.from_pretrained(str(model_dir), device="cpu", backend="transformers",
                                               num_beams=beams, memory=memory, **kwargs))


@pytest.fixture(scope="module")
def ja_en(tiny_ja_en_dir):
    return load(tiny_ja_en_dir)


def without_memory(translator: Translator, texts: list[str]) -> list[str]:
    """What each text translates to alone, through a translator with an empty memory."""
    return [Translator(translator.model, translator.tokenizer, translator.backend.backend, name=translator.name,
                       target_lang=translator.target_lang, num_beams=1).translate([text])[0] for text in texts]


def test_a_repeated_sentence_is_translated_once_within_a_call_and_a_translator(ja_en):
    ja_en.use_memory(None)
    before = ja_en.backend.rows
    out = ja_en.translate(ROWS)
    assert ja_en.backend.rows - before == DISTINCT_SENTENCES
    assert (ja_en.memory.misses, ja_en.memory.hits) == (DISTINCT_SENTENCES, 3)
    assert out == without_memory(ja_en, ROWS)
    text = "これはペンです。金利が上がります。"
    assert ja_en.translate([text]) == without_memory(ja_en, [text])
    assert ja_en.backend.rows - before == DISTINCT_SENTENCES   # the second call translated nothing
    assert ja_en.memory.hits == 5


def test_a_memory_file_serves_a_new_translator_without_decoding(tiny_ja_en_dir, tmp_path):
    first = load(tiny_ja_en_dir, tmp_path / "memory.db")
    out = first.translate(ROWS)
    second = load(tiny_ja_en_dir, tmp_path / "memory.db")
    assert second.translate(ROWS) == out
    assert second.backend.rows == 0 and second.memory.misses == 0 and second.memory.hits == 7


def test_other_beams_or_another_model_do_not_share_entries(tiny_ja_en_dir, tiny_en_ja_dir, tmp_path):
    memory = tmp_path / "memory.db"
    load(tiny_ja_en_dir, memory).translate(ROWS)
    beams = load(tiny_ja_en_dir, memory, beams=2)
    beams.translate(ROWS)
    assert beams.backend.rows == DISTINCT_SENTENCES and beams.memory.hits == 3
    # Only the checkpoint differs: the en->ja model, told to write English.
    other = load(tiny_en_ja_dir, memory, target_lang="en")
    other.translate(ROWS)
    assert other.backend.rows == DISTINCT_SENTENCES
    again = load(tiny_ja_en_dir, memory, beams=2)
    again.translate(ROWS)
    assert again.backend.rows == 0


def test_a_corrupt_or_unusable_memory_file_is_refused_before_loading(tmp_path):
    (tmp_path / "bad.db").write_bytes(b"not a database, just some text\n" * 200)
    for path, reason in ((tmp_path / "bad.db", "not a database"), (tmp_path / "no" / "m.db", "no such directory"),
                         (tmp_path, "is a directory")):
        with pytest.raises(MemoryFileError, match=reason):
            Translator.from_pretrained("no/such-model", memory=path)   # refused before the model is looked up


def test_in_process_memory_keeps_the_most_recently_used_sentences():
    store = InProcessStore(max_entries=2)
    store.put_many("c", {}, [("a", "A"), ("b", "B")])
    assert store.get_many("c", ["a"]) == {"a": "A"}   # a is now the most recent
    store.put_many("c", {}, [("z", "Z")])
    assert store.get_many("c", ["a", "b", "z"]) == {"a": "A", "z": "Z"}


def test_a_memory_store_travels_to_another_process_and_reopens_there(tmp_path):
    import pickle

    store = SQLiteStore(tmp_path / "memory.db")
    store.put_many("c", {"model": "m"}, [("a", "A")])
    script = "import pickle, sys; s = pickle.loads(sys.stdin.buffer.read()); print(s.get_many('c', ['a', 'b']))"
    done = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(store), capture_output=True,
                          timeout=120, env={**os.environ})
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == "{'a': 'A'}"


# ---- the command line ------------------------------------------------------------------------

def cli_args(tiny_ja_en_dir) -> list[str]:
    return ["--ja-en", str(tiny_ja_en_dir), "--device", "cpu", "--beams", "1", "--mt-backend", "transformers"]


SECOND_PROCESS = """
import json, sys
from pipeline import Translator
translator = Translator.from_pretrained(sys.argv[1], device="cpu", backend="transformers", num_beams=1,
                                        memory=sys.argv[2])
generate, decoded = translator.backend.generate, []
translator.backend.generate = lambda batch, *args: decoded.extend(batch) or generate(batch, *args)
rows = sys.stdin.read().split("\\n")[:-1]
print(json.dumps({"out": translator.translate(rows), "decoded": len(decoded)}))
"""


def test_a_second_job_and_process_with_the_same_memory_translates_nothing_new(tiny_ja_en_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("".join(row + "\n" for row in ROWS), encoding="utf-8")
    memory = str(tmp_path / "memory.db")
    summaries = []
    for output in ("first.txt", "second.txt"):
        result = CliRunner().invoke(main, ["translate", str(source), "-o", str(tmp_path / output), "--to", "en",
                                           "--memory", memory, *cli_args(tiny_ja_en_dir)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        summaries.append(result.stderr.strip().splitlines()[-1])
    # the job's summary counts the memory's sentences: found none of them first, all of them second
    found = [re.search(r"translation memory: ([\d,]+) of ([\d,]+) sentences found", line) for line in summaries]
    assert all(found), summaries
    assert found[1].group(1) == found[1].group(2) == found[0].group(2)
    assert int(found[0].group(1)) < int(found[0].group(2))
    first = (tmp_path / "first.txt").read_bytes()
    assert (tmp_path / "second.txt").read_bytes() == first
    done = subprocess.run([sys.executable, "-c", SECOND_PROCESS, str(tiny_ja_en_dir), memory], input=source.read_bytes(), capture_output=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    assert report["decoded"] == 0
    assert "".join(row + "\n" for row in report["out"]).encode() == first


def test_a_job_without_a_memory_file_says_nothing_of_a_translation_memory(tiny_ja_en_dir, tmp_path):
    """Its repeated sentences are translated once all the same, but no memory "found" them."""
    source = tmp_path / "in.txt"
    source.write_text("".join(row + "\n" for row in ROWS * 3), encoding="utf-8")
    result = CliRunner().invoke(main, ["translate", str(source), "-o", str(tmp_path / "out.txt"), "--to", "en",
                                       *cli_args(tiny_ja_en_dir)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = result.stderr.strip().splitlines()[-1]
    assert "rows:" in summary and "translation memory" not in summary and "sentences" not in summary


def test_two_processes_sharing_a_memory_file_at_once_both_finish_with_the_same_output(tiny_ja_en_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("".join(row + "\n" for row in ROWS * 20), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.Popen([sys.executable, "-m", "pipeline", "translate", str(source), "-o", str(tmp_path / name),
                              "--to", "en", "--chunk-rows", "7", "--memory", str(tmp_path / "memory.db"),
                              *cli_args(tiny_ja_en_dir)], env=env, stderr=subprocess.PIPE)
            for name in ("a.txt", "b.txt")]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read().decode()
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()


@pytest.mark.parametrize("command", ["translate", "ask"])
def test_a_corrupt_memory_file_is_one_error_line_and_exit_2(command, tiny_ja_en_dir, model_args, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("金利が上がります。\n", encoding="utf-8")
    bad = tmp_path / "memory.db"
    bad.write_bytes(b"\x00garbage" * 512)
    output = tmp_path / ("out.txt" if command == "translate" else "out.jsonl")
    args = (["translate", str(source), "-o", str(output), "--to", "en", *cli_args(tiny_ja_en_dir)]
            if command == "translate" else ["ask", "--batch", str(source), "-o", str(output), *model_args])
    done = subprocess.run([sys.executable, "-m", "pipeline", *args, "--memory", str(bad)], capture_output=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    stderr = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in stderr and done.stdout == b""
    errors = [line for line in stderr.splitlines() if line.startswith("bilingual-qa: error:")]
    assert len(errors) == 1 and "memory.db" in errors[0] and "not a database" in errors[0], stderr
    assert not output.exists()


def test_memory_without_batch_is_refused(model_args):
    result = CliRunner().invoke(main, ["ask", "What is a bond?", "--memory", "m.db", *model_args])
    assert result.exit_code == 2 and "--memory go with --batch" in result.stderr
