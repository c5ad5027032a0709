"""`--server URL`: ask, compare, translate and ask --batch sent to a live server on loopback print
what the same command prints in-process (timings aside), keep a batch job's guarantees across a
kill, turn the server's refusals into one-line errors, and import no torch on the way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main

from serve_support import KEY, QUESTIONS, base_and_adapter_server, free_port  # tests/serve/serve_support.py

TOKENS = "16"
CRASH_DRIVER = str(Path(__file__).resolve().parents[1] / "jobs" / "crash_driver.py")
BATCH_ROWS = [*QUESTIONS, "", "你们好吗我们的银行", "Why do central banks raise interest rates?",
              "株価が下がると、年金はどうなりますか？", "What is inflation?"]


@pytest.fixture(scope="module")
def local(tiny_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir) -> list[str]:
    """The options that load, here, what the live server serves (conftest's `qa`)."""
    return ["--llm", str(tiny_phi2_dir), "--ja-en", str(tiny_ja_en_dir), "--en-ja", str(tiny_en_ja_dir),
            "--device", "cpu", "--engine", "transformers", "--mt-backend", "transformers", "--beams", "1"]


def in_process(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def remote(*args: str, url: str | None = None, key: str | None = KEY, importtime: bool = False,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """`bilingual-qa ARGS` in a real process, with the key in the environment as a user would set it."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BILINGUAL_QA_")}
    environment |= {"HF_HUB_OFFLINE": "1", **({"BILINGUAL_QA_API_KEY": key} if key else {}), **(env or {})}
    flags = ["-X", "importtime"] if importtime else []
    server = ["--server", url] if url else []
    return subprocess.run([sys.executable, *flags, "-m", "pipeline", *args, *server], capture_output=True,
                          env=environment, timeout=300)


@pytest.fixture(scope="module")
def as_served(tiny_phi2_dir, second_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir):
    """What the command prints here, with each model's path as the server names it (the directory's
    name: no path of the server's machine reaches a client, so through a server a model is named)."""
    def named(output):
        text = output if isinstance(output, str) else output.decode()
        for directory in (tiny_phi2_dir, second_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir):
            text = text.replace(str(directory), Path(directory).name)
        return text if isinstance(output, str) else text.encode()
    return named


def without_timings(text: str):
    data = json.loads(text)
    for result in data if isinstance(data, list) else [data]:
        result.pop("timings")
    return data


def imported_torch(stderr: bytes) -> bool:
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in stderr.decode().splitlines()
               if line.startswith("import time:"))


@pytest.mark.parametrize("fmt", ["text", "markdown", "json"])
def test_ask_through_a_server_prints_what_ask_prints_here(live_server, local, as_served, fmt):
    for question in (QUESTIONS[0], QUESTIONS[1]):  # Japanese, English
        here = in_process("ask", question, "--format", fmt, "--max-new-tokens", TOKENS, *local)
        there = remote("ask", question, "--format", fmt, "--max-new-tokens", TOKENS, "--beams", "1",
                       url=live_server, importtime=True)
        assert there.returncode == 0, there.stderr.decode()[-2000:]
        if fmt == "json":
            assert without_timings(there.stdout) == without_timings(as_served(here.stdout))
        else:
            assert there.stdout.decode() == as_served(here.stdout)
        assert not imported_torch(there.stderr)  # the client pays for no model


def test_streamed_ask_through_a_server_prints_what_it_prints_here(live_server, local, as_served):
    for question in (QUESTIONS[3], QUESTIONS[2]):
        here = in_process("ask", question, "--stream", "--max-new-tokens", TOKENS, *local)
        there = remote("ask", question, "--stream", "--max-new-tokens", TOKENS, url=live_server)
        assert there.returncode == 0, there.stderr.decode()[-2000:]
        assert there.stdout.decode() == as_served(here.stdout)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_compare_through_a_server_prints_what_compare_prints_here(live_server, local, second_phi2_dir,
                                                                   tiny_phi2_dir, as_served, fmt):
    models = ["--llm", str(tiny_phi2_dir), "--llm", str(second_phi2_dir)]
    options = [option for option in local if option not in ("--llm", str(tiny_phi2_dir))]
    here = in_process("compare", QUESTIONS[0], *models, "--format", fmt, "--max-new-tokens", TOKENS, *options)
    there = remote("compare", QUESTIONS[0], *models, "--format", fmt, "--max-new-tokens", TOKENS, url=live_server)
    assert there.returncode == 0, there.stderr.decode()[-2000:]
    if fmt == "json":
        assert without_timings(there.stdout) == without_timings(as_served(here.stdout))
    else:
        assert there.stdout.decode() == as_served(here.stdout)


@pytest.fixture(scope="module")
def adapter_server(tiny_phi2_dir, tiny_lora_dir, tiny_ja_en_dir, tiny_en_ja_dir):
    """`serve --llm PHI2 --llm ADAPTER` (no key): the adapter's /v1/models entry names its base."""
    with base_and_adapter_server(tiny_phi2_dir, tiny_lora_dir, tiny_ja_en_dir, tiny_en_ja_dir) as url:
        yield url


def test_compare_of_one_adapter_through_a_server_pairs_it_with_its_base(adapter_server, tiny_phi2_dir,
                                                                       tiny_lora_dir):
    base, adapter = Path(tiny_phi2_dir).name, Path(tiny_lora_dir).name  # as the server names them
    ask = ["compare", QUESTIONS[0], "--max-new-tokens", TOKENS, "--format", "json"]
    alone = remote(*ask, "--llm", adapter, url=adapter_server, key=None)
    both = remote(*ask, "--llm", base, "--llm", adapter, url=adapter_server, key=None)
    assert alone.returncode == 0, alone.stderr.decode()[-2000:]
    assert len(json.loads(alone.stdout)) == 2
    assert without_timings(alone.stdout) == without_timings(both.stdout)


def write_lines(path: Path, rows: list[str]) -> Path:
    path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    return path


def test_translate_through_a_server_writes_the_bytes_it_writes_here(live_server, tiny_ja_en_dir, tmp_path):
    rows = ["金利が上がると、人や企業にとって借り入れの費用が高くなります。", "円安は日本の輸出品を海外で安くします。", "",
            "The quick brown fox jumps over the lazy dog.", "你们的银行", "東京の株式市場は午後に少し下がりました。"] * 3
    source = write_lines(tmp_path / "in.txt", rows)
    options = ["--ja-en", str(tiny_ja_en_dir), "--device", "cpu", "--mt-backend", "transformers", "--beams", "1"]
    in_process("translate", str(source), "-o", str(tmp_path / "here.txt"), "--to", "en", *options)
    there = remote("translate", str(source), "-o", str(tmp_path / "there.txt"), "--to", "en", "--chunk-rows", "4",
                   "--concurrency", "3", url=live_server, importtime=True)
    assert there.returncode == 0, there.stderr.decode()[-2000:]
    assert (tmp_path / "there.txt").read_bytes() == (tmp_path / "here.txt").read_bytes()
    assert ((tmp_path / "there.txt.errors.jsonl").read_bytes()
            == (tmp_path / "here.txt.errors.jsonl").read_bytes() != b"")  # the Chinese row, in both
    assert "18 rows:" in there.stderr.decode() and not imported_torch(there.stderr)


def test_ask_batch_through_a_server_writes_the_bytes_it_writes_here(live_server, local, as_served, tmp_path):
    source = write_lines(tmp_path / "questions.txt", BATCH_ROWS)
    in_process("ask", "--batch", str(source), "-o", str(tmp_path / "here.jsonl"), "--max-new-tokens", TOKENS, *local)
    there = remote("ask", "--batch", str(source), "-o", str(tmp_path / "there.jsonl"), "--max-new-tokens", TOKENS,
                   "--chunk-rows", "3", url=live_server)
    assert there.returncode == 0, there.stderr.decode()[-2000:]
    assert (tmp_path / "there.jsonl").read_bytes() == as_served((tmp_path / "here.jsonl").read_bytes())
    assert ((tmp_path / "there.jsonl.errors.jsonl").read_bytes()
            == (tmp_path / "here.jsonl.errors.jsonl").read_bytes() != b"")
    again = remote("ask", "--batch", str(source), "-o", str(tmp_path / "there.jsonl"), "--max-new-tokens", TOKENS,
                   "--chunk-rows", "3", url=live_server)
    assert again.returncode == 0 and "already complete" in again.stderr.decode()


@pytest.mark.parametrize("point", ["mid_chunk", "after_progress"])
def test_a_batch_through_a_server_killed_midway_resumes_to_the_same_bytes(live_server, tmp_path, point):
    source = write_lines(tmp_path / "questions.txt", BATCH_ROWS)
    args = ["ask", "--batch", str(source), "--max-new-tokens", TOKENS, "--chunk-rows", "2", "--server", live_server]
    whole = remote(*args, "-o", str(tmp_path / "whole.jsonl"))
    assert whole.returncode == 0, whole.stderr.decode()[-2000:]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "BILINGUAL_QA_API_KEY": KEY}
    killed = subprocess.run([sys.executable, CRASH_DRIVER, point, "2", *args, "-o", str(tmp_path / "out.jsonl")],
                            capture_output=True, env=environment, timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    progress = json.loads((tmp_path / "out.jsonl.progress.json").read_text())
    assert 0 < progress["counts"]["rows"] < len(BATCH_ROWS)
    resumed = remote(*args, "-o", str(tmp_path / "out.jsonl"))
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert (tmp_path / "out.jsonl.errors.jsonl").read_bytes() == (tmp_path / "whole.jsonl.errors.jsonl").read_bytes()


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    stderr = proc.stderr.decode()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and proc.stdout == b""
    lines = [line for line in stderr.splitlines() if not line.startswith("import time:")]
    assert len(lines) == 1 and lines[0].startswith("bilingual-qa: error: "), stderr
    return lines[0]


def test_an_unreachable_server_is_one_line_and_exit_2(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert "cannot reach the server at" in one_line_error(remote("ask", "What is a bond?", url=url))
    source = write_lines(tmp_path / "q.txt", ["What is a bond?"])
    line = one_line_error(remote("ask", "--batch", str(source), "-o", str(tmp_path / "a.jsonl"), url=url))
    assert "cannot reach the server at" in line
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "a.jsonl.progress.json").exists()
    assert "http://HOST:PORT" in one_line_error(remote("ask", "What is a bond?", url="localhost:8000"))


def test_the_servers_refusals_are_one_line_errors(live_server):
    assert "API key is wrong" in one_line_error(remote("ask", "What is a bond?", url=live_server, key="nope"))
    assert "unknown model 'no-such-model'" in one_line_error(
        remote("ask", "What is a bond?", "--llm", "no-such-model", url=live_server))
    # Refused here, as in-process, before the server is asked: the same line as without --server.
    here = subprocess.run([sys.executable, "-m", "pipeline", "ask", "\x1b[31mred"], capture_output=True, timeout=60)
    assert one_line_error(remote("ask", "\x1b[31mred", url=live_server)) == one_line_error(here)


def test_options_that_choose_local_models_are_refused_with_a_server(live_server):
    line = one_line_error(remote("ask", "What is a bond?", "--device", "cpu", url=live_server, importtime=True))
    assert "--device" in line and "--server" in line
    assert "--concurrency goes with --server" in one_line_error(
        remote("translate", "x.txt", "-o", "y.txt", "--to", "en", "--concurrency", "2"))


def test_the_server_comes_from_the_environment_too(live_server):
    proc = remote("ask", "What is a bond?", "--max-new-tokens", TOKENS, env={"BILINGUAL_QA_SERVER": live_server})
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().startswith("Q: What is a bond?")
