"""What a job tells its user: progress that moves inside a chunk, no bar over the loading lines,
--quiet, nothing left behind by a job that never started, and options that do not go with --batch."""

from __future__ import annotations

import fcntl
import functools

import pytest
from click.testing import CliRunner

from pipeline import Translator
from pipeline.cli import main
from pipeline.jobs import progress, runner
from pipeline.jobs import workers as jobs

SENTENCES = ["金利が上がると、借り入れの費用が高くなります。", "円安は輸出品を海外で安くします。", "これはペンです。"]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def translate_args(tiny_ja_en_dir):
    return ["--ja-en", str(tiny_ja_en_dir), "--device", "cpu", "--beams", "1", "--mt-backend", "transformers"]


class RecordingDisplay(progress.ProgressDisplay):
    updates: list[tuple[int, float]] = []

    def update(self, offset: int, rows: float) -> None:
        RecordingDisplay.updates.append((offset, rows))
        super().update(offset, rows)


def test_progress_moves_batch_by_batch_inside_one_long_line(tiny_ja_en_dir, tmp_path, monkeypatch, capsys):
    """One line of 120 different sentences is one row in one chunk: the display still moves as batches finish,
    and without a terminal it prints rows, the share of the input, a rate and the time left."""
    translator = Translator.from_pretrained(str(tiny_ja_en_dir), device="cpu", backend="transformers",
                                            num_beams=1, batch_tokens=64)
    source = tmp_path / "long.txt"
    # 120 different sentences: the translation memory would translate repeats once, in one batch
    source.write_text("".join(f"その{i}、" + SENTENCES[i % 3] for i in range(120)) + "\n", encoding="utf-8")
    RecordingDisplay.updates = []
    display = functools.partial(RecordingDisplay, terminal=False, line_seconds=0.0)
    monkeypatch.setattr(runner, "ProgressDisplay", display)
    jobs.translate_file(source, tmp_path / "out.txt", to="en", load_translator=lambda: translator,
                        options=translator.job_options())
    size = source.stat().st_size
    inside = [(offset, rows) for offset, rows in RecordingDisplay.updates if 0 < offset < size]
    assert len(inside) >= 5  # moved within the row, batch by batch
    assert [offset for offset, _ in inside] == sorted(offset for offset, _ in inside)
    assert all(0 < rows < 1 for _, rows in inside)
    lines = capsys.readouterr().err.splitlines()
    assert any("% of the input" in line and "rows/s" in line and "left" in line for line in lines)


def test_the_bar_is_drawn_only_after_the_model_has_loaded(tmp_path, translate_args, monkeypatch):
    """On a terminal the bar starts at the first progress, after the loading line, not over it."""
    monkeypatch.setattr(runner, "ProgressDisplay", functools.partial(progress.ProgressDisplay, terminal=True))
    source = tmp_path / "in.txt"
    source.write_text("".join(s + "\n" for s in SENTENCES * 4), encoding="utf-8")
    result = invoke("translate", str(source), "-o", str(tmp_path / "out.txt"), "--to", "en", "--chunk-rows", "4",
                    *translate_args)
    assert result.exit_code == 0, result.output
    loading, bar = result.stderr.find("bilingual-qa: loading "), result.stderr.find("%|")
    assert 0 <= loading < bar, result.stderr


def test_quiet_job_shows_no_bar_and_no_loading_line_but_the_summary(tmp_path, translate_args, monkeypatch):
    monkeypatch.setattr(runner, "ProgressDisplay", functools.partial(progress.ProgressDisplay, terminal=True))
    source = tmp_path / "in.txt"
    source.write_text("".join(s + "\n" for s in SENTENCES), encoding="utf-8")
    result = invoke("translate", str(source), "-o", str(tmp_path / "out.txt"), "--to", "en", "--quiet",
                    *translate_args)
    assert result.exit_code == 0 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bilingual-qa: 3 rows: 3 done") and "%|" not in result.stderr


def test_a_job_whose_model_fails_to_load_leaves_no_file_and_reruns(tmp_path, translate_args):
    source = tmp_path / "in.txt"
    source.write_text("".join(s + "\n" for s in SENTENCES), encoding="utf-8")
    output = tmp_path / "out.txt"
    failed = invoke("translate", str(source), "-o", str(output), "--to", "en", *translate_args,
                    "--ja-en", str(tmp_path / "no-such-model"))
    assert failed.exit_code == 2 and "does not exist" in failed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]  # no output, errors or progress file
    again = invoke("translate", str(source), "-o", str(output), "--to", "en", *translate_args)
    assert again.exit_code == 0 and output.read_text(encoding="utf-8").count("\n") == 3


def test_ask_batch_on_an_output_another_job_holds_is_refused_before_any_model_loads(tmp_path):
    source = tmp_path / "q.txt"
    source.write_text("What is a bond?\n", encoding="utf-8")
    output = tmp_path / "a.jsonl"
    with open(output, "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Models that do not exist: had they been loaded first, that would be the error.
        result = invoke("ask", "--batch", str(source), "-o", str(output), "--llm", str(tmp_path / "none"),
                        "--ja-en", str(tmp_path / "none"), "--en-ja", str(tmp_path / "none"), "--device", "cpu")
    assert result.exit_code == 2 and "another job is writing" in result.stderr, result.stderr


@pytest.mark.parametrize("extra", [["--stream"], ["--format", "json"], ["--format", "markdown"]])
def test_batch_with_stream_or_format_is_refused_in_one_line(tmp_path, model_args, extra):
    (tmp_path / "q.txt").write_text("What is a bond?\n", encoding="utf-8")
    result = invoke("ask", "--batch", str(tmp_path / "q.txt"), "-o", str(tmp_path / "a.jsonl"), *extra, *model_args)
    assert result.exit_code == 2 and "--format and --stream are for a single QUESTION" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "a.jsonl").exists()


@pytest.mark.parametrize("extra", [["--chunk-rows", "3"], ["--workers", "2"], ["--cluster", "tcp://h:8786"]])
def test_job_options_without_batch_are_refused(model_args, extra):
    result = invoke("ask", "What is a bond?", *extra, *model_args)
    assert result.exit_code == 2 and "go with --batch" in result.stderr


def test_txt_output_keeps_the_crlf_line_endings_of_a_crlf_input(tmp_path, translate_args):
    source = tmp_path / "in.txt"
    source.write_bytes("これはペンです。\r\n\r\n円安です。\r\n金利です。\n".encode("utf-8"))
    result = invoke("translate", str(source), "-o", str(tmp_path / "out.txt"), "--to", "en", *translate_args)
    assert result.exit_code == 0, result.output
    out = (tmp_path / "out.txt").read_bytes()
    lines = out.split(b"\n")
    assert [line.endswith(b"\r") for line in lines[:-1]] == [True, True, True, False] and lines[-1] == b""
    assert lines[1] == b"\r"  # the blank line stays blank, CRLF kept


def test_chunk_rows_defaults_come_from_the_job_constants():
    translate_help = invoke("translate", "--help").output
    ask_help = invoke("ask", "--help").output
    assert f"[default: {jobs.TRANSLATE_CHUNK_ROWS};" in " ".join(translate_help.split())
    assert f"[default: {jobs.ASK_CHUNK_ROWS};" in " ".join(ask_help.split())
