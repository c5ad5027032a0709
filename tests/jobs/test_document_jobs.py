"""Document jobs keep the guarantees of every job: exactly once, resumable after a crash or
kill -9, a changed document refused, an unreadable one refused with nothing written; through the
Python API with any translator, and through the real CLI on the tiny checkpoints, each format."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import zipfile

import pytest
from click.testing import CliRunner

from pipeline import translate_document
from pipeline.cli import main
from pipeline.errors import DocumentError, JobError

from crashes import Crash, crash_at  # tests/jobs/crashes.py

CRASH_DRIVER = os.path.join(os.path.dirname(__file__), "crash_driver.py")
JA = ["金利が上がると、借り入れの費用が高くなります。", "円安は日本の輸出品を海外で安くします。",
      "東京の株式市場は午後に少し下がりました。", "これはペンです。"]
MARKDOWN = "".join(f"## 見出し{i}\n\n{JA[i % 4]}\n`code{i}` と [リンク](https://example.com/{i}).\n\n"
                   for i in range(12)) + "```\nkept()\n```\n"
SRT = "".join(f"{i + 1}\n00:00:{i:02d},000 --> 00:00:{i:02d},900\n{JA[i % 4]}\n<i>{JA[(i + 1) % 4]}</i>\n\n"
              for i in range(6))
VTT = "WEBVTT\n\n" + "".join(f"00:{i:02d}.000 --> 00:{i:02d}.900 align:start\n{JA[i % 4]}\n\n" for i in range(5))
HTML = ("<!DOCTYPE html>\n<html lang=\"ja\"><head><title>金利</title><script>var a = '金利';</script></head>"
        "<body><p>" + "</p>\n<p>".join(JA) + "</p><img src=\"a.png\" alt=\"グラフ\"></body></html>\n")


class Counting:
    """Upper-cases (ASCII stays ASCII, so every text changes visibly by a tag) and counts texts."""

    def __init__(self):
        self.texts: list[str] = []

    def translate(self, texts: list[str]) -> list[str]:
        self.texts += texts
        return [f"<{text}>" for text in texts]


def test_a_crashed_document_job_resumes_and_translates_each_segment_once(tmp_path):
    source = tmp_path / "in.md"
    source.write_text(MARKDOWN, encoding="utf-8")
    first = Counting()
    with pytest.raises(Crash):
        translate_document(source, tmp_path / "out.md", first, chunk_rows=5,
                           checkpoint=crash_at("after_progress", 3))
    assert not (tmp_path / "out.md").exists()  # no half document, ever
    second = Counting()
    summary = translate_document(source, tmp_path / "out.md", second, chunk_rows=5)
    whole = Counting()
    translate_document(source, tmp_path / "whole.md", whole, chunk_rows=5)
    assert (tmp_path / "out.md").read_bytes() == (tmp_path / "whole.md").read_bytes()
    assert first.texts[:10] + second.texts == whole.texts  # two chunks committed, never redone
    assert summary.rows == len(whole.texts) and "segments" in summary.describe()
    assert not (tmp_path / "out.md.segments.jsonl").exists()
    again = translate_document(source, tmp_path / "out.md", Counting(), chunk_rows=5)
    assert again.already_complete


def test_a_crash_after_the_last_commit_is_rebuilt_from_the_segments_on_the_next_run(tmp_path, monkeypatch):
    from pipeline.jobs import documents

    source = tmp_path / "in.srt"
    source.write_text(SRT, encoding="utf-8")

    def dies(path, write):
        raise Crash("before the rename")
    monkeypatch.setattr(documents, "write_atomically", dies)
    with pytest.raises(Crash):
        translate_document(source, tmp_path / "out.srt", Counting())
    monkeypatch.undo()
    again = Counting()
    summary = translate_document(source, tmp_path / "out.srt", again)
    assert summary.already_complete and again.texts == []
    assert (tmp_path / "out.srt").read_text(encoding="utf-8").count("<") > 10


def test_a_changed_document_is_refused_and_a_broken_one_writes_nothing(tmp_path):
    source = tmp_path / "in.md"
    source.write_text(MARKDOWN, encoding="utf-8")
    with pytest.raises(Crash):
        translate_document(source, tmp_path / "out.md", Counting(), chunk_rows=5,
                           checkpoint=crash_at("after_progress", 2))
    source.write_text(MARKDOWN + "\nもう一行。\n", encoding="utf-8")
    with pytest.raises(JobError, match=r"out\.md holds an unfinished job of an input that has changed"):
        translate_document(source, tmp_path / "out.md", Counting())
    broken = tmp_path / "broken.srt"
    broken.write_text("not a subtitle\n", encoding="utf-8")
    with pytest.raises(DocumentError):
        translate_document(broken, tmp_path / "broken-out.srt", Counting())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("broken-out")) == []


def test_any_translator_that_returns_the_wrong_count_is_refused(tmp_path):
    class Short:
        def translate(self, texts):
            return texts[:-1]
    source = tmp_path / "in.vtt"
    source.write_text(VTT, encoding="utf-8")
    with pytest.raises(TypeError, match="one string per text"):
        translate_document(source, tmp_path / "out.vtt", Short())


# ---- the real command on the tiny checkpoints ----

@pytest.fixture
def args(tiny_ja_en_dir):
    return ["--to", "en", "--ja-en", str(tiny_ja_en_dir), "--device", "cpu", "--beams", "1",
            "--mt-backend", "transformers"]


def invoke(*argv):
    return CliRunner().invoke(main, list(argv), catch_exceptions=False)


def docx_bytes() -> bytes:
    import docx

    document = docx.Document()
    document.sections[0].header.paragraphs[0].text = JA[3]
    paragraph = document.add_paragraph(JA[0])
    paragraph.add_run(JA[1]).bold = True
    document.add_table(rows=1, cols=1).cell(0, 0).text = JA[2]
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name,content", [("doc.md", MARKDOWN), ("doc.srt", SRT), ("doc.vtt", VTT),
                                          ("page.html", HTML), ("doc.docx", None)])
def test_the_cli_translates_each_format_keeping_its_structure(tmp_path, args, name, content):
    source = tmp_path / name
    source.write_bytes(docx_bytes() if content is None else content.encode())
    output = tmp_path / f"out{source.suffix}"
    result = invoke("translate", str(source), "-o", str(output), *args)
    assert result.exit_code == 0, result.output
    assert "segments:" in result.stderr and "0 failed" in result.stderr
    data = output.read_bytes()
    if source.suffix == ".docx":
        before, after = zipfile.ZipFile(source), zipfile.ZipFile(output)
        assert before.namelist() == after.namelist()
        for part in before.namelist():
            if part not in ("word/document.xml", "word/header1.xml"):
                assert before.read(part) == after.read(part)
        assert JA[0].encode() not in after.read("word/document.xml")
        assert after.read("word/document.xml").count(b"<w:b/>") == before.read("word/document.xml").count(b"<w:b/>")
        return
    text = data.decode()
    for line in content.splitlines():
        if "-->" in line or line.startswith(("```", "WEBVTT", "kept()")) or line.strip().isdigit():
            assert line in text.splitlines()
    for kept in ("`code3`", "(https://example.com/7)", "<script>var a = '金利';</script>", 'src="a.png"', "<i>"):
        assert kept in text or kept not in content
    assert all(sentence not in text for sentence in JA)  # every Japanese sentence went through the model
    assert len(text.splitlines()) == len(content.splitlines())
    if source.suffix == ".html":
        assert '<html lang="en">' in text


def test_the_cli_refuses_a_broken_document_in_one_line_and_writes_nothing(tmp_path, args):
    from cli_run import assert_one_line_error, run_cli

    source = tmp_path / "broken.docx"
    source.write_bytes(b"this is not a zip")
    proc = run_cli("translate", str(source), "-o", str(tmp_path / "out.docx"), *args)
    assert_one_line_error(proc, "not a readable Word document")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.docx"]
    forced = tmp_path / "notes.txt"
    forced.write_text("# 見出し\n\n" + JA[0] + "\n", encoding="utf-8")
    assert invoke("translate", str(forced), "-o", str(tmp_path / "notes.out"), "--format", "md",
                  *args).exit_code == 0
    assert (tmp_path / "notes.out").read_text(encoding="utf-8").startswith("# ")
    html = tmp_path / "page.html"
    html.write_text(HTML, encoding="utf-8")
    refused = run_cli("translate", str(html), "-o", str(tmp_path / "page.md"), *args)
    assert_one_line_error(refused, "the output must be a .html file like the input")


def test_a_document_job_killed_by_sigkill_resumes_to_the_same_bytes(tmp_path, args):
    source = tmp_path / "in.md"
    source.write_text(MARKDOWN, encoding="utf-8")
    output, progress = tmp_path / "out.md", tmp_path / "out.md.progress.json"
    argv = ["translate", str(source), "-o", str(output), "--chunk-rows", "4", *args]
    died = subprocess.run([sys.executable, CRASH_DRIVER, "mid_chunk", "3", *argv], capture_output=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert died.returncode == -signal.SIGKILL, died.stderr.decode()
    record = json.loads(progress.read_text())
    assert record["counts"]["rows"] == 8 and not record["finished"] and not output.exists()
    resumed = invoke(*argv)
    assert resumed.exit_code == 0, resumed.output
    assert invoke("translate", str(source), "-o", str(tmp_path / "whole.md"), "--chunk-rows", "4",
                  *args).exit_code == 0
    assert output.read_bytes() == (tmp_path / "whole.md").read_bytes()
    assert "already complete" in invoke(*argv).stderr


def test_the_readme_document_example_runs_as_written(tiny_ja_en_dir, tmp_path):
    from pathlib import Path
    import re
    import shutil

    root = Path(__file__).resolve().parents[2]
    pages = [(root / "README.md").read_text(encoding="utf-8")] + [page.read_text(encoding="utf-8")
                                                                  for page in sorted((root / "docs").glob("*.md"))]
    [block] = [b for page in pages for b in re.findall(r"```python\n(.*?)```", page, re.S)
               if "translate_document(" in b]
    code = block.replace('"Helsinki-NLP/opus-mt-ja-en"', repr(str(tiny_ja_en_dir)))
    shutil.copytree(root / "examples", tmp_path / "examples")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr.decode()
    output = (tmp_path / "notes_en.md").read_text(encoding="utf-8")
    assert "rate = 0.5  # コードはそのまま" in output and "(https://www.boj.or.jp/)" in output
    assert "借り入れの費用" not in output


def test_a_document_job_on_two_local_workers_writes_what_one_process_writes(tmp_path, args):
    pytest.importorskip("distributed")
    source = tmp_path / "in.vtt"
    source.write_text(VTT, encoding="utf-8")
    common = ["--chunk-rows", "2", *args]
    spread = invoke("translate", str(source), "-o", str(tmp_path / "spread.vtt"), "--workers", "2", *common)
    assert spread.exit_code == 0, spread.output
    assert invoke("translate", str(source), "-o", str(tmp_path / "here.vtt"), *common).exit_code == 0
    assert (tmp_path / "spread.vtt").read_bytes() == (tmp_path / "here.vtt").read_bytes()


def test_a_document_job_uses_the_translation_memory(tmp_path, args):
    source = tmp_path / "in.srt"
    source.write_text(SRT, encoding="utf-8")
    memory = ["--memory", str(tmp_path / "memory.db")]
    first = invoke("translate", str(source), "-o", str(tmp_path / "first.srt"), *memory, *args)
    assert first.exit_code == 0, first.output
    again = invoke("translate", str(source), "-o", str(tmp_path / "again.srt"), *memory, *args)
    found = again.stderr.split("translation memory: ")[1].split(" sentences")[0]
    hits, total = found.split(" of ")
    assert hits == total and int(total) > 0
    assert (tmp_path / "first.srt").read_bytes() == (tmp_path / "again.srt").read_bytes()
