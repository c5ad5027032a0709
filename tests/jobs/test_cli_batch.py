"""`bilingual-qa translate` and `ask --batch`: in-process through click for most cases, and in real
subprocesses that die (SIGKILL at a named point through a test driver, and a kill -9 from outside)
and are run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.jobs import workers as jobs

from crashes import Crash, crash_at, kill_when_committed  # tests/jobs/crashes.py

CRASH_DRIVER = os.path.join(os.path.dirname(__file__), "crash_driver.py")

ROWS = ["金利が上がると、人や企業にとって借り入れの費用が高くなります。", "円安は日本の輸出品を海外で安くします。", "",
        "The quick brown fox jumps over the lazy dog.", "東京の株式市場は午後に少し下がりました。", "これはペンです。"]


@pytest.fixture
def translate_args(tiny_ja_en_dir):
    return ["--ja-en", str(tiny_ja_en_dir), "--device", "cpu", "--beams", "1", "--mt-backend", "transformers"]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write_rows(path, rows):
    path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    return path


def test_translate_writes_aligned_lines_and_a_summary_on_stderr(tmp_path, translate_args):
    source = write_rows(tmp_path / "in.txt", ROWS)
    result = invoke("translate", str(source), "--output", str(tmp_path / "out.txt"), "--to", "en", *translate_args)
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "out.txt").read_text(encoding="utf-8").split("\n")
    assert len(lines) == len(ROWS) + 1 and lines[2] == "" and lines[3] == ROWS[3]
    assert "6 rows: 4 done, 1 copied, 0 failed, 1 blank" in result.stderr
    again = invoke("translate", str(source), "--output", str(tmp_path / "out.txt"), "--to", "en", *translate_args)
    assert again.exit_code == 0 and "already complete" in again.stderr


def test_translate_loads_only_the_model_of_its_direction(tmp_path, translate_args):
    source = write_rows(tmp_path / "in.txt", ROWS)
    result = invoke("translate", str(source), "-o", str(tmp_path / "out.txt"), "--to", "en",
                    "--en-ja", str(tmp_path / "no-such-model"), *translate_args)
    assert result.exit_code == 0, result.output


def test_translate_with_failed_rows_still_exits_zero_and_names_the_errors_file(tmp_path, translate_args):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "円安"}\n{"text": ""}\nnot json\n', encoding="utf-8")
    errors = tmp_path / "bad.jsonl"
    result = invoke("translate", str(source), "-o", str(tmp_path / "out.jsonl"), "--to", "en", "--errors",
                    str(errors), "--quiet", *translate_args)
    # --quiet: the summary alone (issue 16: errors and the summary only; no loading lines)
    assert result.exit_code == 0 and result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("bilingual-qa: 3 rows: 1 done, 0 copied, 2 failed")
    assert [json.loads(line)["line"] for line in errors.read_text().splitlines()] == [2, 3]


@pytest.mark.parametrize("make,args,message", [
    (None, ["missing.txt", "-o", "out.txt"], "no such file"),
    ("in.doc", ["in.doc", "-o", "out.doc"], "unknown input type"),
    ("in.txt", ["in.txt", "-o", "in.txt"], "four different files"),
    ("in.csv", ["in.csv", "-o", "out.csv", "--field", "body"], "--field is for .jsonl"),
    ("in.txt", ["in.txt", "-o", "out.txt", "--from", "en"], "the same language"),
    ("in.txt", ["in.txt", "-o", "out.txt", "--column", "body"], "one text per line"),
])
def test_translate_refuses_unusable_arguments_with_exit_2(tmp_path, translate_args, make, args, message):
    if make:
        write_rows(tmp_path / make, ["text", "円安"])
    paths = [str(tmp_path / a) if a.startswith(("in.", "out.", "missing")) else a for a in args]
    result = invoke("translate", *paths, "--to", "en", *translate_args)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_translate_refuses_a_changed_input_under_an_unfinished_output(tmp_path, translate_args, monkeypatch):
    source = write_rows(tmp_path / "in.txt", ROWS)
    output = tmp_path / "out.txt"
    run_job, checkpoint = jobs.run_job, crash_at("after_progress", 2)
    monkeypatch.setattr(jobs, "run_job", lambda *a, **kw: run_job(*a, **{**kw, "checkpoint": checkpoint}))
    with pytest.raises(Crash):
        invoke("translate", str(source), "-o", str(output), "--to", "en", "--chunk-rows", "2", *translate_args)
    monkeypatch.undo()
    write_rows(source, ROWS + ["追加の行です。"])
    result = invoke("translate", str(source), "-o", str(output), "--to", "en", "--chunk-rows", "2", *translate_args)
    assert result.exit_code == 2 and "changed since; pass --restart" in result.stderr
    restarted = invoke("translate", str(source), "-o", str(output), "--to", "en", "--chunk-rows", "2", "--restart",
                       *translate_args)
    assert restarted.exit_code == 0 and output.read_text(encoding="utf-8").count("\n") == len(ROWS) + 1


def test_ask_batch_writes_one_json_object_per_question(tmp_path, model_args):
    source = tmp_path / "q.csv"
    source.write_text('id,question\n1,"What is ""inflation""?"\n2,円安とは何ですか？\n3,这个问题很难吗\n',
                      encoding="utf-8")
    result = invoke("ask", "--batch", str(source), "-o", str(tmp_path / "a.jsonl"), "--column", "question",
                    *model_args, "--device", "cpu", "--beams", "1", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(o["id"], o["question"]) for o in out] == [("1", 'What is "inflation"?'), ("2", "円安とは何ですか？")]
    assert {"source_lang", "question_en", "question_ja", "answer_en", "answer_ja", "finish_reason",
            "models", "generated_tokens"} <= set(out[0])
    assert "3 rows: 2 done, 0 copied, 1 failed" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["What is a bond?", "--batch", "q.txt", "-o", "a.jsonl"], "not both"),
    (["--batch", "q.txt"], "--batch needs --output"),
    (["What is a bond?", "-o", "a.jsonl"], "go with --batch"),
    (["--batch", "q.txt", "-o", "a.txt"], "must be a .jsonl file"),
])
def test_ask_batch_refuses_unusable_arguments_with_exit_2(tmp_path, model_args, args, message):
    write_rows(tmp_path / "q.txt", ["What is a bond?"])
    paths = [str(tmp_path / a) if a in ("q.txt", "a.jsonl", "a.txt") else a for a in args]
    result = invoke("ask", *paths, *model_args)
    assert result.exit_code == 2 and message in result.stderr


def run_cli_dying_at(point: str, occurrence: int, *args: str) -> subprocess.CompletedProcess:
    """The CLI in a subprocess that SIGKILLs itself the `occurrence`-th time the job reaches `point`."""
    return subprocess.run([sys.executable, CRASH_DRIVER, point, str(occurrence), *args], capture_output=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def many_rows(count: int) -> list[str]:
    return [ROWS[i % len(ROWS)] + ("" if i % 4 else "これはペンです。") if ROWS[i % len(ROWS)] else ""
            for i in range(count)]


def test_translate_killed_at_a_commit_then_by_kill_9_loses_no_row_and_repeats_none(tmp_path, translate_args):
    """Two real deaths of real processes: SIGKILL between a chunk and its progress record, then
    SIGKILL at whatever moment; a third run finishes, and the files equal an uninterrupted run's."""
    source = tmp_path / "in.csv"
    rows = [row for row in many_rows(60) if row]
    source.write_text("id,text\n" + "".join(f'{i},"{row}\n{row}"\n' for i, row in enumerate(rows)),
                      encoding="utf-8")
    args = ["--to", "en", "--chunk-rows", "5", *translate_args]
    output, progress = tmp_path / "out.csv", tmp_path / "out.csv.progress.json"
    died = run_cli_dying_at("before_progress", 4, "translate", str(source), "-o", str(output), *args)
    assert died.returncode == -signal.SIGKILL, died.stderr.decode()
    committed = json.loads(progress.read_text())["counts"]["rows"]
    assert committed == 10  # the header commit, then two chunks of five

    job = subprocess.Popen([sys.executable, "-m", "pipeline", "translate", str(source), "-o", str(output), *args],
                           env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.DEVNULL)
    kill_when_committed(job, progress, committed + 10, 120)
    assert not json.loads(progress.read_text())["finished"]

    assert invoke("translate", str(source), "-o", str(output), *args).exit_code == 0
    assert invoke("translate", str(source), "-o", str(tmp_path / "whole.csv"), *args).exit_code == 0
    assert output.read_bytes() == (tmp_path / "whole.csv").read_bytes()
    def errors_of(name: str) -> bytes | None:  # an errors file exists only where a row failed
        path = tmp_path / f"{name}.csv.errors.jsonl"
        return path.read_bytes() if path.exists() else None

    assert errors_of("out") == errors_of("whole")
