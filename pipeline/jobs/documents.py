"""Document jobs: a Markdown, HTML, subtitle or Word file translated into the same format, with the
guarantees of every job (runner.py).

How a document maps onto the runner's chunks: the document is parsed once per run (fast, and
deterministic, so every run sees the same segments in the same order) and its segments are the
job's rows: segment i is row i, in chunks of `chunk_rows`. The runner's input is the document
itself, so its fingerprint (size, mtime, hashed head and tail) refuses a changed document; its
output is OUTPUT.segments.jsonl, one translated segment per line, appended and committed chunk by
chunk, resumed after `kill -9` like any job. Only when every segment is in does the document get
rebuilt and written to OUTPUT at once (temporary file, fsync, rename): OUTPUT never holds half a
document. Then the segments file goes. A crash between the last commit and the rename leaves the
segments file behind; the next run finds the job finished and rebuilds from it.

A segment the job cannot translate (a language not asked for, under --from auto) is kept as it was
and listed in the errors file, so the document is always whole.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from pipeline import documents
from pipeline.errors import JobError
from pipeline.jobs.files import InputRow, Outcome
from pipeline.jobs.runner import Checkpoint, JobPaths, JobSummary, no_checkpoint, run_job, write_atomically
from pipeline.jobs.workers import TranslationWorker, chunk_runner, check_languages
from pipeline.text.detect import SUPPORTED_LANGUAGES, other_language

DOCUMENT_CHUNK_ROWS = 512


class SegmentReader:
    """The document's segments as rows. Offsets are the share of segments done, scaled to the
    document's size (what the progress bar measures); a resumed job goes on at its next row."""

    header_end, first_line = 0, 1

    def __init__(self, document: documents.Document, size: int):
        self.texts = [segment.text for segment in document.segments]
        self.size = size

    def rows(self, f: BinaryIO, offset: int, line: int) -> Iterator[InputRow]:
        total = len(self.texts)
        for index in range(line - 1, total):
            text = self.texts[index]
            # `raw` is what the errors file shows; kept on one line, as the runner counts lines by it.
            yield InputRow(index + 1, self.size * (index + 1) // total, " ".join(text.splitlines()).encode(),
                           text=text)


class SegmentWriter:
    """One JSON line per segment: its translation, or the segment itself where it failed."""

    def header(self) -> bytes:
        return b""

    def row(self, row: InputRow, outcome: Outcome | None) -> bytes:
        text = row.text if outcome is None or outcome.error else outcome.line
        return (json.dumps(text, ensure_ascii=False) + "\n").encode("utf-8")


def _read_document(source: Path, fmt: str) -> documents.Document:
    if not source.is_file():
        raise JobError(f"{source}: no such file")
    return documents.parse(source.read_bytes(), fmt)


def _paths(source: Path, output: Path, errors) -> JobPaths:
    if output.exists() and output.resolve() == source.resolve():
        raise JobError("the input and output must be two different files")
    segments = output.with_name(output.name + ".segments.jsonl")
    paths = JobPaths.of(source, segments, errors or output.with_name(output.name + ".errors.jsonl"))
    paths.progress = output.with_name(output.name + ".progress.json")
    return paths


def run_document_job(source: str | Path, output: str | Path, *, fmt: str | None, target_lang: str | None,
                     make_worker: Callable, options: dict, errors=None, restart: bool = False,
                     quiet: bool = False, chunk_rows: int = DOCUMENT_CHUNK_ROWS, runner=None,
                     checkpoint: Checkpoint = no_checkpoint) -> JobSummary:
    """Parse, translate the segments as a job, rebuild the document into `output` at the end."""
    source, output = Path(source), Path(output)
    forced, fmt = fmt, documents.format_of(source, fmt)
    if fmt is None:
        raise JobError(f"{source}: not a document format; use .md, .html, .srt, .vtt or .docx, or --format")
    if forced is None and documents.format_of(output) != fmt:
        raise JobError(f"the output must be a {source.suffix} file like the input (or pass --format)")
    document = _read_document(source, fmt)  # an unreadable document stops here: nothing is written
    paths = _paths(source, output, errors)
    if output.exists() and not restart and not paths.progress.exists():
        raise JobError(f"{output} already exists and holds no unfinished job; "
                       "pass --restart to overwrite it, or choose another output")
    job_options = {"command": "translate-document", "format": fmt, "to": target_lang,
                   "chunk_rows": chunk_rows, **options}
    try:
        summary = run_job(paths, SegmentReader(document, source.stat().st_size), SegmentWriter(), job_options,
                          make_worker, chunk_rows=chunk_rows, restart=restart, quiet=quiet, checkpoint=checkpoint,
                          runner=runner)
    except JobError as error:  # the runner names its own output, the segments file: name the document
        raise JobError(str(error).replace(str(paths.output), str(output))) from None
    summary.output, summary.unit = output, "segments"
    pending = paths.output.exists() and paths.output.stat().st_size > 0
    if not summary.already_complete or pending or not document.segments or not output.exists():
        lines = paths.output.read_bytes().splitlines() if paths.output.exists() else []
        translations = [json.loads(line) for line in lines]
        if len(translations) != len(document.segments):
            raise JobError(f"{paths.output} holds {len(translations)} of {len(document.segments)} segments; "
                           "pass --restart to start over")
        data = documents.rebuild(document, translations, target_lang)
        write_atomically(output, lambda f: f.write(data))
    paths.output.unlink(missing_ok=True)
    return summary


def translate_document_file(input: str | Path, output: str | Path, *, to: str, load_translator: Callable,
                            options: dict, source_lang: str = "auto", fmt: str | None = None, errors=None,
                            restart: bool = False, quiet: bool = False, chunk_rows: int = DOCUMENT_CHUNK_ROWS,
                            workers=None, cluster: str | None = None,
                            checkpoint: Checkpoint = no_checkpoint) -> JobSummary:
    """`bilingual-qa translate` on a document: segments in the target language are copied, others
    translated (the same worker as a .txt job, so the translation memory and --workers apply)."""
    check_languages(to, source_lang)
    return run_document_job(input, output, fmt=fmt, target_lang=to,
                            make_worker=functools.partial(TranslationWorker, load_translator, source_lang, to),
                            options={"from": source_lang, **options}, errors=errors, restart=restart,
                            quiet=quiet, chunk_rows=chunk_rows, runner=chunk_runner(workers, cluster),
                            checkpoint=checkpoint)


class _AnyTranslator:
    """A caller's translator as the job's worker takes it: one translation per text, or an error."""

    def __init__(self, translator):
        self.translator = translator
        self.memory = getattr(translator, "memory", None)  # counted only where it keeps a file

    def translate(self, texts: list[str]) -> list[str]:
        translations = list(self.translator.translate(texts))
        if len(translations) != len(texts) or not all(isinstance(text, str) for text in translations):
            # The caller's bug, not a segment's: it stops the job (a JobError would fail row by row).
            raise TypeError(f"the translator returned {len(translations)} results for {len(texts)} texts; "
                            "it must return one string per text")
        return translations


def _options_of(translator) -> dict:
    job_options = getattr(translator, "job_options", None)
    if callable(job_options):
        return job_options()
    kind = type(translator)
    return {"translator": f"{kind.__module__}.{kind.__qualname__}"}


def translate_document(source: str | Path, output: str | Path, translator, *, format: str | None = None,
                       to: str | None = None, errors=None, restart: bool = False, quiet: bool = True,
                       chunk_rows: int = DOCUMENT_CHUNK_ROWS, checkpoint: Checkpoint = no_checkpoint) -> JobSummary:
    """Translate the document `source` into `output`, of the same format, with `translator`: anything
    with `translate(texts: list[str]) -> list[str]`. Every segment goes to the translator (no
    language detection). `to` (default: the translator's `target_lang`, if it has one) sets
    `lang` on an HTML page. Exactly once and resumable, like every job; returns a JobSummary."""
    target = to or getattr(translator, "target_lang", None)
    # Every row is "in the other language" of a made-up pair: the worker then sends all of them on.
    pair_target = target if target in SUPPORTED_LANGUAGES else "ja"
    wrapped = _AnyTranslator(translator)
    worker = functools.partial(TranslationWorker, lambda: wrapped, other_language(pair_target), pair_target)
    return run_document_job(source, output, fmt=format, target_lang=target, make_worker=worker,
                            options=_options_of(translator), errors=errors, restart=restart, quiet=quiet,
                            chunk_rows=chunk_rows, checkpoint=checkpoint)
