"""Batch jobs over files: translate every row, or answer every question, each exactly once.

One runner serves both (`translate_file`, `ask_file`); the CLI and the Python API call it.

How a job survives a crash, `kill -9` or power loss without losing, repeating or reordering a row:
rows are processed in chunks. Each chunk's output lines and error records are appended and fsynced,
and only then is the progress record beside the output (OUTPUT.progress.json) replaced atomically
(temp file, fsync, rename). The record holds the input's byte offset after the chunk and the sizes of
the output and errors files at that moment. A resumed job first truncates both files back to those
sizes, which throws away whatever a crash left after the last committed chunk, then seeks the input
and goes on. Chunk boundaries are the same in every run, so a resumed job writes the same bytes an
uninterrupted one would.

The record also holds the job's fingerprint (the input's path, size, mtime and a hash of its first
and last bytes, and every option that affects the output); a different job under an unfinished
output is refused rather than mixed in. Models load only after all these checks pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from pipeline.text.detect import SUPPORTED_LANGUAGES, detect_language
from pipeline.errors import BilingualQAError, JobError
from pipeline.llm.engine import GenerationSettings
from pipeline.jobs.files import (CsvWriter, InputRow, JsonlWriter, Outcome, TxtWriter, error_record,
                        input_format, open_reader)

if TYPE_CHECKING:
    from pipeline.qa import BilingualQA
    from pipeline.mt.translator import Translator

PROGRESS_VERSION = 1
TRANSLATE_CHUNK_ROWS = 512
ASK_CHUNK_ROWS = 64  # answers are slow: a crash should cost little work
ASK_BATCH_ROWS = 32  # questions per LLM batch
SAMPLE_BYTES = 1 << 16  # the input's head and tail that are hashed into the fingerprint
QUIET_LINE_SECONDS = 30.0
CRASH_ENV = "BILINGUAL_QA_CRASH_AT"  # "POINT" or "POINT:N": os._exit at the N-th time POINT is reached
CRASH_POINTS = ("mid_chunk", "before_progress", "after_progress")

# Tests set this to a function that raises at a named point, to crash a job inside the test process.
crash_hook: Callable[[str], None] | None = None
_crash_counts: dict[str, int] = {}

Worker = Callable[[list[str]], list[Outcome]]


@dataclass
class JobSummary:
    output: Path
    errors: Path
    rows: int = 0  # input rows read, blank and failed ones included
    done: int = 0  # translated or answered
    copied: int = 0  # already in the target language
    failed: int = 0  # in the errors file
    blank: int = 0
    already_complete: bool = False
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        return {"rows": self.rows, "done": self.done, "copied": self.copied, "failed": self.failed,
                "blank": self.blank}

    def describe(self) -> str:
        if self.already_complete:
            return (f"{self.output} is already complete ({self.rows:,} rows); nothing to do"
                    " (pass --restart to run the job again)")
        failed = f"{self.failed:,} failed" + (f" (see {self.errors})" if self.failed else "")
        return (f"{self.rows:,} rows: {self.done:,} done, {self.copied:,} copied, {failed}, "
                f"{self.blank:,} blank; wrote {self.output} in {self.seconds:.1f} s")


@dataclass
class JobPaths:
    input: Path
    output: Path
    errors: Path
    progress: Path

    @classmethod
    def of(cls, input: str | Path, output: str | Path, errors: str | Path | None = None) -> "JobPaths":
        """The job's files, refusing any that would overwrite another or cannot be written."""
        source, target = Path(input), Path(output)
        if not source.is_file():
            raise JobError(f"{source}: no such file")
        if not target.parent.is_dir():
            raise JobError(f"{target.parent}: no such directory for the output")
        paths = cls(source, target, Path(errors) if errors else target.with_name(target.name + ".errors.jsonl"),
                    target.with_name(target.name + ".progress.json"))
        if not paths.errors.parent.is_dir():
            raise JobError(f"{paths.errors.parent}: no such directory for the errors file")
        resolved = [p.resolve() for p in (paths.input, paths.output, paths.errors, paths.progress)]
        if len(set(resolved)) < 4 or any(p.exists() and p.samefile(source) for p in resolved[1:]):
            raise JobError("the input, output, errors and progress files must be four different files")
        return paths


@dataclass
class Progress:
    """The committed state of a job: what is in the output and errors files, and where to go on."""
    job: dict
    input_offset: int
    next_line: int
    output_offset: int
    errors_offset: int
    counts: dict
    finished: bool = False
    version: int = PROGRESS_VERSION


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its rename is durable enough
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_progress(path: Path, progress: Progress) -> None:
    """Replace the record atomically: a crash leaves the old record or the new one, never half."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(asdict(progress), f, ensure_ascii=False, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)


def load_progress(path: Path) -> Progress | None:
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("version") != PROGRESS_VERSION:
            raise ValueError("unknown version")
        return Progress(**record)
    except (ValueError, TypeError) as error:
        raise JobError(f"{path} cannot be read ({error}); pass --restart to start the job over") from None


def _sample_hash(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLE_BYTES))
        f.seek(max(0, size - SAMPLE_BYTES))
        digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def fingerprint(paths: JobPaths, options: dict) -> dict:
    """What makes two runs the same job; JSON-normalised so it compares equal to a loaded record."""
    stat = paths.input.stat()
    job = {"input": str(paths.input.resolve()), "input_size": stat.st_size, "input_mtime_ns": stat.st_mtime_ns,
           "input_sample_sha256": _sample_hash(paths.input, stat.st_size),
           "errors": str(paths.errors.resolve()), "options": options}
    return json.loads(json.dumps(job))


def _differences(old: dict, new: dict) -> str:
    changed = [key for key in new if key != "options" and old.get(key) != new[key]]
    if changed:
        return "of an input that has changed since" if any(k.startswith("input") for k in changed) \
            else "with another errors file"
    options = [name for name in new["options"] if old.get("options", {}).get(name) != new["options"][name]]
    return "with other options (" + ", ".join(options or ["options"]) + ")"


def start_or_resume(paths: JobPaths, job: dict, reader, restart: bool) -> Progress:
    """The progress to go on from: fresh, or the committed state of the same unfinished job."""
    existing = None if restart else load_progress(paths.progress)
    if existing is not None and existing.job != job and existing.counts["rows"] == 0 and not existing.finished:
        existing = None  # nothing was committed (say the model failed to load): start afresh, as asked now
        restart = True
    if existing is None and not restart:
        for path in (paths.output, paths.errors):
            if path.exists():
                raise JobError(f"{path} already exists and holds no unfinished job; "
                               "pass --restart to overwrite it, or choose another output")
    if existing is None:
        fresh = Progress(job, reader.header_end, reader.first_line, 0, 0, JobSummary(paths.output, paths.errors).counts())
        save_progress(paths.progress, fresh)  # first, so a crash from here on resumes rather than refuses
        return fresh
    if existing.job != job:
        state = "a finished" if existing.finished else "an unfinished"
        raise JobError(f"{paths.output} holds {state} job {_differences(existing.job, job)}; "
                       "pass --restart to start over")
    if not existing.finished:
        for path, size in ((paths.output, existing.output_offset), (paths.errors, existing.errors_offset)):
            if (path.stat().st_size if path.exists() else 0) < size:
                raise JobError(f"{path} is shorter than its progress record says; pass --restart to start over")
    return existing


def _checkpoint(point: str) -> None:
    """Where tests crash a job: the hook (in process) or CRASH_ENV (os._exit, like kill -9)."""
    if crash_hook is not None:
        crash_hook(point)
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    name, _, count = wanted.partition(":")
    if name == point:
        _crash_counts[point] = _crash_counts.get(point, 0) + 1
        if _crash_counts[point] >= int(count or 1):
            os._exit(86)


class _Appender:
    """An output file cut back to its committed size and locked against a second job."""

    def __init__(self, path: Path, size: int):
        self.file = open(path, "a+b")  # created if missing; never truncated by opening
        try:
            import fcntl

            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: no advisory locks
            pass
        except OSError:
            self.file.close()
            raise JobError(f"another job is writing {path}") from None
        self.file.truncate(size)
        self.file.seek(size)

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def sync(self) -> int:
        self.file.flush()
        os.fsync(self.file.fileno())
        return self.file.tell()

    def close(self) -> None:
        self.file.close()


class ProgressDisplay:
    """A tqdm bar (bytes of input, with rows/s) on a terminal; a line every 30 s otherwise."""

    def __init__(self, total_bytes: int, start_bytes: int, rows: int, quiet: bool):
        self.total, self.start_bytes, self.start_rows = total_bytes, start_bytes, rows
        self.quiet = quiet
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, initial=start_bytes, unit="B", unit_scale=True,
                            file=sys.stderr, dynamic_ncols=True, desc="bilingual-qa")

    def update(self, offset: int, rows: int) -> None:
        rate = (rows - self.start_rows) / max(time.monotonic() - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(offset - self.bar.n)
            self.bar.set_postfix_str(f"{rows:,} rows, {rate:.1f} rows/s", refresh=False)
        elif not self.quiet and time.monotonic() - self.last_line >= QUIET_LINE_SECONDS:
            self.last_line = time.monotonic()
            print(f"bilingual-qa: {rows:,} rows, {offset / max(self.total, 1):.0%} of the input, "
                  f"{rate:.1f} rows/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _chunks(rows: Iterator[InputRow], size: int) -> Iterator[list[InputRow]]:
    chunk: list[InputRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _process_chunk(chunk: list[InputRow], worker: Worker, writer, summary: JobSummary) -> tuple[bytes, bytes]:
    """The chunk's output bytes and error records, in input order; the worker sees good rows only."""
    good = [row.text for row in chunk if row.text is not None]
    outcomes = iter(worker(good) if good else [])
    output, errors = [], []
    for row in chunk:
        outcome = next(outcomes) if row.text is not None else None
        reason = row.error or (outcome.error if outcome else None)
        summary.rows += 1
        if reason:
            summary.failed += 1
            errors.append(error_record(row, reason))
        elif row.blank:
            summary.blank += 1
        elif outcome.copied:
            summary.copied += 1
        else:
            summary.done += 1
        output.append(writer.row(row, outcome))
    return b"".join(output), b"".join(errors)


def _commit(paths: JobPaths, progress: Progress, out: _Appender, err: _Appender, offset: int, line: int,
            summary: JobSummary) -> None:
    progress.output_offset, progress.errors_offset = out.sync(), err.sync()
    _checkpoint("before_progress")
    progress.input_offset, progress.next_line, progress.counts = offset, line, summary.counts()
    save_progress(paths.progress, progress)
    _checkpoint("after_progress")


def run_job(paths: JobPaths, reader, writer, options: dict, make_worker: Callable[[], Worker], *,
            chunk_rows: int, restart: bool = False, quiet: bool = False) -> JobSummary:
    """Run (or resume) one job: every input row ends in the output or the errors file, once."""
    if chunk_rows < 1:
        raise JobError("--chunk-rows must be at least 1")
    progress = start_or_resume(paths, fingerprint(paths, options), reader, restart)
    summary = JobSummary(paths.output, paths.errors, **progress.counts)
    if progress.finished:
        summary.already_complete = True
        return summary
    started = time.monotonic()
    worker = make_worker()  # models load only once the job is known to be runnable
    out, err = _Appender(paths.output, progress.output_offset), None
    try:
        err = _Appender(paths.errors, progress.errors_offset)
        if progress.output_offset == 0:
            out.write(writer.header())
            _commit(paths, progress, out, err, progress.input_offset, progress.next_line, summary)
        _run_chunks(paths, reader, writer, worker, progress, out, err, summary, chunk_rows, quiet)
    finally:
        out.close()
        if err is not None:
            err.close()
    progress.finished = True
    save_progress(paths.progress, progress)
    summary.seconds = time.monotonic() - started
    return summary


def _run_chunks(paths, reader, writer, worker, progress, out, err, summary, chunk_rows, quiet) -> None:
    total = paths.input.stat().st_size
    display = ProgressDisplay(total, progress.input_offset, summary.rows, quiet)
    try:
        with open(paths.input, "rb") as source:
            source.seek(progress.input_offset)
            for chunk in _chunks(reader.rows(source, progress.input_offset, progress.next_line), chunk_rows):
                output, errors = _process_chunk(chunk, worker, writer, summary)
                half = len(output) // 2
                out.write(output[:half])
                out.file.flush()
                _checkpoint("mid_chunk")  # part of a chunk on disk, its progress not recorded
                out.write(output[half:])
                err.write(errors)
                last = chunk[-1]
                next_line = last.line + max(1, last.raw.count(b"\n"))
                _commit(paths, progress, out, err, last.end_offset, next_line, summary)
                display.update(last.end_offset, summary.rows)
    finally:
        display.close()


# --- translate -------------------------------------------------------------------------------------

def other_language(language: str) -> str:
    return "ja" if language == "en" else "en"


class TranslationWorker:
    """Rows already in the target language are copied; others are translated, a chunk at a time."""

    def __init__(self, load_translator: Callable[[], "Translator"], source_lang: str, target_lang: str):
        self.load_translator = load_translator
        self._translator: "Translator | None" = None
        self.source_lang = source_lang  # "ja", "en" or "auto"
        self.target_lang = target_lang

    @property
    def translator(self) -> "Translator":
        # Loaded at the first row that needs it: a file already in the target language loads no model.
        if self._translator is None:
            self._translator = self.load_translator()
        return self._translator

    def language(self, text: str) -> str:
        """The row's language; a BilingualQAError for one this job does not take."""
        if self.source_lang != "auto":
            return self.source_lang
        language = detect_language(text)
        if language not in SUPPORTED_LANGUAGES:
            raise BilingualQAError(
                f"language '{language}' not asked for: this job translates "
                f"{other_language(self.target_lang)} and copies {self.target_lang}")
        return language

    def __call__(self, texts: list[str]) -> list[Outcome]:
        languages: list[str | BilingualQAError] = []
        for text in texts:
            try:
                languages.append(self.language(text))
            except BilingualQAError as error:
                languages.append(error)
        todo = [i for i, language in enumerate(languages) if language == other_language(self.target_lang)]
        translated = dict(zip(todo, self.translate([texts[i] for i in todo])))
        return [self.outcome(text, languages[i], translated.get(i)) for i, text in enumerate(texts)]

    def translate(self, texts: list[str]) -> list[str | BilingualQAError]:
        """The whole chunk in one call (the Translator sorts and batches it); should a row be
        refused, the others are translated one by one so that only it fails."""
        if not texts:
            return []
        translator = self.translator  # a model that fails to load stops the job: it is no row's fault
        try:
            return list(translator.translate(texts))
        except BilingualQAError:
            if len(texts) == 1:
                raise
        return [self._translate_one(text) for text in texts]

    def _translate_one(self, text: str) -> str | BilingualQAError:
        try:
            return self.translator.translate([text])[0]
        except BilingualQAError as error:
            return error

    def outcome(self, text: str, language, translation) -> Outcome:
        for problem in (language, translation):
            if isinstance(problem, BilingualQAError):
                return Outcome(error=str(problem))
        copied = language == self.target_lang
        result = text if copied else translation
        added = {"translation": result}
        if self.source_lang == "auto":
            added["source_lang"] = language
        return Outcome(line=result, added=added, copied=copied)


def field_for(input: str | Path, field: str | None, column: str | None) -> str:
    """The JSONL field or CSV column that holds the text, refusing the option of the other format."""
    fmt = input_format(Path(input))
    if fmt in ("csv", "tsv") and field is not None:
        raise JobError("--field is for .jsonl input; use --column for .csv/.tsv")
    if fmt == "jsonl" and column is not None:
        raise JobError("--column is for .csv/.tsv input; use --field for .jsonl")
    if fmt == "txt" and (field or column) is not None:
        raise JobError("a .txt input holds one text per line: --field and --column are for .jsonl and .csv")
    return field or column or "text"


def translate_file(input: str | Path, output: str | Path, *, to: str, load_translator: Callable[[], "Translator"],
                   options: dict, source_lang: str = "auto", field: str = "text", errors: str | Path | None = None,
                   restart: bool = False, quiet: bool = False,
                   chunk_rows: int = TRANSLATE_CHUNK_ROWS) -> JobSummary:
    """Translate every row of a .txt/.jsonl/.csv/.tsv file into `to`; the output has the input's format.

    `load_translator` is called only if there is work to do; `options` (everything that affects the
    output: model, beams...) goes into the job's fingerprint.
    """
    if to not in SUPPORTED_LANGUAGES or source_lang not in SUPPORTED_LANGUAGES + ("auto",):
        raise JobError("translate between ja and en: --to ja|en, --from ja|en|auto")
    if source_lang == to:
        raise JobError(f"--from {source_lang} and --to {to} are the same language")
    paths = JobPaths.of(input, output, errors)
    fmt = input_format(paths.input)
    if paths.output.suffix.lower() != paths.input.suffix.lower():
        raise JobError(f"the output must be a {paths.input.suffix} file like the input")
    reader = open_reader(paths.input, fmt, field)
    added = ["translation"] + (["source_lang"] if source_lang == "auto" else [])
    writer = {"txt": TxtWriter(), "jsonl": JsonlWriter()}.get(fmt) or CsvWriter(reader, added)
    job_options = {"command": "translate", "to": to, "from": source_lang, "field": field,
                   "chunk_rows": chunk_rows, **options}
    return run_job(paths, reader, writer, job_options,
                   lambda: TranslationWorker(load_translator, source_lang, to),
                   chunk_rows=chunk_rows, restart=restart, quiet=quiet)


def translator_options(translator: "Translator") -> dict:
    """The fingerprint options of a loaded translator."""
    return {"model": translator.name, "beams": translator.num_beams, "batch_tokens": translator.batch_tokens,
            "mt_backend": translator.backend.name, "dtype": str(translator.model.dtype)}


# --- ask -------------------------------------------------------------------------------------------

class AnswerWorker:
    """Questions answered in LLM batches of at most ASK_BATCH_ROWS, similar lengths together."""

    def __init__(self, qa: "BilingualQA", source_lang: str | None, settings: GenerationSettings):
        self.qa, self.source_lang, self.settings = qa, source_lang, settings

    def __call__(self, texts: list[str]) -> list[Outcome]:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        outcomes: list[Outcome] = [Outcome()] * len(texts)
        for start in range(0, len(order), ASK_BATCH_ROWS):
            group = order[start:start + ASK_BATCH_ROWS]
            results = self.qa.ask_batch([texts[i] for i in group], source_lang=self.source_lang,
                                        settings=self.settings)
            for i, result in zip(group, results):
                outcomes[i] = self.outcome(result)
        return outcomes

    @staticmethod
    def outcome(result) -> Outcome:
        if isinstance(result, BilingualQAError):
            return Outcome(error=str(result))
        fields = result.to_dict()
        # Stage timings belong to a whole batch, not to one question, and would make two runs of
        # the same job differ; the summary gives the job's time instead.
        fields.pop("timings", None)
        return Outcome(added=fields)


def ask_file(input: str | Path, output: str | Path, *, load_qa: Callable[[], "BilingualQA"], options: dict,
             source_lang: str | None = None, settings: GenerationSettings = GenerationSettings(),
             field: str = "text", errors: str | Path | None = None, restart: bool = False,
             quiet: bool = False, chunk_rows: int = ASK_CHUNK_ROWS) -> JobSummary:
    """Answer every question of a .txt/.jsonl/.csv/.tsv file into a JSONL file: per question, the
    fields of `ask --format json` (less timings) after the input's own (a .txt line as `question`)."""
    paths = JobPaths.of(input, output, errors)
    if paths.output.suffix.lower() != ".jsonl":
        raise JobError("the answers are written as JSON lines: the output must be a .jsonl file")
    fmt = input_format(paths.input)
    reader = open_reader(paths.input, fmt, field)
    writer = JsonlWriter(base_field="question" if fmt == "txt" else None)
    job_options = {"command": "ask", "field": field, "chunk_rows": chunk_rows, "source_lang": source_lang,
                   "settings": asdict(settings), **options}
    return run_job(paths, reader, writer, job_options, lambda: AnswerWorker(load_qa(), source_lang, settings),
                   chunk_rows=chunk_rows, restart=restart, quiet=quiet)


def qa_options(qa: "BilingualQA") -> dict:
    """The fingerprint options of a loaded pipeline."""
    return {"models": qa.models, "beams": qa.ja_en.num_beams, "engine": qa.answerer.engine.name,
            "mt_backend": qa.ja_en.backend.name, "dtype": str(qa.answerer.model.dtype)}
