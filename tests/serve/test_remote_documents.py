"""`translate DOC --server URL`: every document format is parsed and rebuilt here, its segments
translated by a live server's /translate, and the output is byte for byte what the in-process
command writes with the same models; the job keeps its guarantees (resumed after kill -9 to the
same bytes, each segment sent once) and no torch is imported on the client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main

from serve_support import KEY  # tests/serve/serve_support.py

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DOCUMENTS = ["notes_ja.md", "page_ja.html", "talk_ja.srt", "talk_ja.vtt", "report_ja.docx"]
CRASH_DRIVER = str(Path(__file__).resolve().parents[1] / "jobs" / "crash_driver.py")


def remote(*args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    """`bilingual-qa ARGS` in a process of its own, the server and key from the environment (as the
    README exports them)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BILINGUAL_QA_")}
    environment |= {"HF_HUB_OFFLINE": "1", "BILINGUAL_QA_API_KEY": KEY}
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, *args], capture_output=True, env=environment, timeout=300)


def local_options(ja_en: Path) -> list[str]:
    """What the live server runs (conftest's `qa`): the tiny ja->en model, transformers, one beam."""
    return ["--ja-en", str(ja_en), "--device", "cpu", "--mt-backend", "transformers", "--beams", "1"]


def imported_torch(stderr: bytes) -> bool:
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in stderr.decode().splitlines()
               if line.startswith("import time:"))


@pytest.mark.parametrize("name", DOCUMENTS)
def test_a_document_through_a_server_is_the_bytes_written_here(name, live_server, tiny_ja_en_dir, tmp_path):
    source = str(shutil.copy(EXAMPLES / name, tmp_path / name))
    here, there = tmp_path / f"here{Path(name).suffix}", tmp_path / f"there{Path(name).suffix}"
    done = CliRunner().invoke(main, ["translate", source, "-o", str(here), "--to", "en",
                                     *local_options(tiny_ja_en_dir)], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    proc = remote("-m", "pipeline", "translate", source, "-o", str(there), "--to", "en", "--chunk-rows", "3",
                  "--concurrency", "2", "--server", live_server, importtime=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert there.read_bytes() == here.read_bytes() != Path(source).read_bytes()
    assert "segments:" in proc.stderr.decode() and not imported_torch(proc.stderr)
    assert not Path(f"{there}.segments.jsonl").exists()  # the job's own file goes once the document is written


def test_a_document_named_by_format_through_a_server_from_the_environment(live_server, tiny_ja_en_dir, tmp_path):
    """--format for another extension, and the server from BILINGUAL_QA_SERVER (the README's export)."""
    source = str(shutil.copy(EXAMPLES / "talk_ja.srt", tmp_path / "talk.txt"))
    here, there = tmp_path / "here.out", tmp_path / "there.out"
    CliRunner().invoke(main, ["translate", source, "-o", str(here), "--to", "en", "--format", "srt",
                              *local_options(tiny_ja_en_dir)], catch_exceptions=False)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BILINGUAL_QA_")}
    environment |= {"BILINGUAL_QA_SERVER": live_server, "BILINGUAL_QA_API_KEY": KEY}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "translate", source, "-o", str(there), "--to", "en",
                           "--format", "srt"], capture_output=True, env=environment, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert there.read_bytes() == here.read_bytes()


def test_a_document_job_through_a_server_killed_midway_resumes_to_the_same_bytes(live_server, tmp_path):
    source = str(shutil.copy(EXAMPLES / "notes_ja.md", tmp_path / "notes.md"))
    args = ["translate", source, "--to", "en", "--chunk-rows", "2", "--server", live_server]
    whole = remote("-m", "pipeline", *args, "-o", str(tmp_path / "whole.md"))
    assert whole.returncode == 0, whole.stderr.decode()[-2000:]
    killed = remote(CRASH_DRIVER, "after_progress", "2", *args, "-o", str(tmp_path / "out.md"))
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    progress = json.loads((tmp_path / "out.md.progress.json").read_text())
    assert progress["counts"]["rows"] > 0 and not progress["finished"] and not (tmp_path / "out.md").exists()
    resumed = remote("-m", "pipeline", *args, "-o", str(tmp_path / "out.md"))
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert (tmp_path / "out.md").read_bytes() == (tmp_path / "whole.md").read_bytes()
    again = remote("-m", "pipeline", *args, "-o", str(tmp_path / "out.md"))
    assert again.returncode == 0 and "already complete" in again.stderr.decode()


def test_an_unreadable_document_through_a_server_is_one_line_and_writes_nothing(live_server, tmp_path):
    source = tmp_path / "broken.docx"
    source.write_bytes(b"this is not a zip")
    proc = remote("-m", "pipeline", "translate", str(source), "-o", str(tmp_path / "out.docx"), "--to", "en",
                  "--server", live_server)
    lines = proc.stderr.decode().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "not a readable Word document" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.docx"]
