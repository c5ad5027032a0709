"""The durable job runner: every input row ends in the output or the errors file, exactly once.

How a job survives a crash, `kill -9` or power loss without losing, repeating or reordering a row:
rows are processed in chunks. Each chunk's output lines and error records are appended and fsynced,
and only then is the progress record beside the output (OUTPUT.progress.json) replaced atomically
(temp file, fsync, rename). The record holds the input's byte offset after the chunk and the sizes of
the output and errors files at that moment. A resumed job first truncates both files back to those
sizes, which throws away whatever a crash left after the last committed chunk, then seeks the input
and goes on. Chunk boundaries are the same in every run, so a resumed job writes the same bytes an
uninterrupted one would, whether its chunks ran here or on the workers of a cluster (which return
them to this process, the only one that writes the output and holds its lock).

The record also holds the job's fingerprint (the input's path, size, mtime and a hash of its first
and last bytes, and the caller's `options`: everything that affects the output); a different job
under an unfinished output is refused rather than mixed in. Models load only after these checks
pass and the output is locked.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Protocol

from pipeline.errors import JobError
from pipeline.jobs.files import InputRow, Outcome, error_record
from pipeline.jobs.progress import ProgressDisplay

PROGRESS_VERSION = 1
SAMPLE_BYTES = 1 << 16  # the input's head and tail that are hashed into the fingerprint

Report = Callable[[float], None]  # a worker tells the share of its chunk done so far (0..1)
Worker = Callable[[list[str], "Report | None"], list[Outcome]]
Checkpoint = Callable[[str], None]  # called at "mid_chunk", "before_progress", "after_progress"


def no_checkpoint(point: str) -> None:
    """The default checkpoint: nothing. Tests pass one that crashes the job at a named point."""


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
    memory_hits: int = 0  # sentences the translation memory had (this run)
    memory_misses: int = 0  # sentences translated and added to it
    unit: str = "rows"  # what a row is to the user: a document job's rows are its segments

    def counts(self) -> dict[str, int]:
        return {"rows": self.rows, "done": self.done, "copied": self.copied, "failed": self.failed,
                "blank": self.blank}

    def describe(self) -> str:
        if self.already_complete:
            return (f"{self.output} is already complete ({self.rows:,} {self.unit}); nothing to do"
                    " (pass --restart to run the job again)")
        failed = f"{self.failed:,} failed" + (f" (see {self.errors})" if self.failed else "")
        sentences = self.memory_hits + self.memory_misses
        memory = (f"; translation memory: {self.memory_hits:,} of {sentences:,} sentences found"
                  if sentences else "")
        return (f"{self.rows:,} {self.unit}: {self.done:,} done, {self.copied:,} copied, {failed}, "
                f"{self.blank:,} blank; wrote {self.output} in {self.seconds:.1f} s{memory}")


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
        resolved = [_resolved(p) for p in (paths.input, paths.output, paths.errors, paths.progress)]
        if len(set(resolved)) < 4 or any(p.exists() and p.samefile(source) for p in resolved[1:]):
            raise JobError("the input, output, errors and progress files must be four different files")
        return paths


def _resolved(path: Path) -> Path:
    """`path` resolved, or a JobError for a symbolic link loop (opening it would fail mid-job)."""
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise JobError(f"{path}: a symbolic link loop") from None
    try:
        return path.resolve()
    except RuntimeError:  # Python < 3.13's word for a symbolic link loop (3.13 leaves it unresolved)
        raise JobError(f"{path}: a symbolic link loop") from None
    except OSError as error:
        raise JobError(f"{path}: {error.strerror or error}") from None


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


def fsync_directory(path: Path) -> None:
    """Make a rename in `path` durable (where the system can open a directory)."""
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
    write_json(path, asdict(progress))


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace `path` with what `write` writes to a binary file, atomically: a temporary sibling,
    fsynced, renamed over `path`, the directory synced (a crash leaves the old file or the new one)."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


def write_json(path: Path, value: dict) -> None:
    """Replace `path` with `value` as JSON, atomically (write_atomically)."""
    data = json.dumps(value, ensure_ascii=False, indent=1).encode("utf-8")
    write_atomically(path, lambda f: f.write(data))


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


def start_or_resume(paths: JobPaths, job: dict, reader, restart: bool, existed: dict[Path, bool]) -> Progress:
    """The progress to go on from: fresh, or the committed state of the same unfinished job.

    `existed` says which of the output and errors files were there before this run locked them."""
    existing = None if restart else load_progress(paths.progress)
    if existing is not None and existing.job != job and existing.counts["rows"] == 0 and not existing.finished:
        existing = None  # nothing was committed (say the model failed to load): start afresh, as asked now
        restart = True
    if existing is None and not restart:
        for path in (paths.output, paths.errors):
            if existed[path]:
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


class _Appender:
    """An output file locked against a second job; `cut` takes it back to its committed size."""

    def __init__(self, path: Path):
        self.file = open(path, "a+b")  # created if missing; never truncated by opening
        try:
            import fcntl

            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: no advisory locks
            pass
        except OSError:
            self.file.close()
            raise JobError(f"another job is writing {path}") from None

    def cut(self, size: int) -> None:
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


class ChunkRunner(Protocol):
    """Where chunks run (a context: models load on entry): `run` yields each chunk with its good
    rows' outcomes, in input order, and calls `report(chunk, share done)` as a worker goes on."""

    def __enter__(self) -> "ChunkRunner": ...
    def __exit__(self, *exc) -> None: ...
    def run(self, chunks: Iterator[list[InputRow]], report: Callable[[list[InputRow], float], None]
            ) -> Iterator[tuple[list[InputRow], list[Outcome]]]: ...


def good_texts(chunk: list[InputRow]) -> list[str]:
    """What the worker sees of a chunk: the text of its good rows."""
    return [row.text for row in chunk if row.text is not None]


class InProcess:
    """Chunks run one after another in this process, on one worker made once."""

    def __init__(self, make_worker: Callable[[], Worker]):
        self.make_worker = make_worker
        self.worker: Worker | None = None

    def __enter__(self) -> "InProcess":
        self.worker = self.make_worker()
        return self

    def __exit__(self, *exc) -> None:
        self.worker = None

    def run(self, chunks, report):
        for chunk in chunks:
            texts = good_texts(chunk)
            yield chunk, (self.worker(texts, lambda share: report(chunk, share)) if texts else [])


def _chunks(rows: Iterator[InputRow], size: int) -> Iterator[list[InputRow]]:
    chunk: list[InputRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _render_chunk(chunk: list[InputRow], outcomes: list[Outcome], writer, summary: JobSummary
                  ) -> tuple[bytes, bytes]:
    """The chunk's output bytes and error records, in input order."""
    outcomes = iter(outcomes)
    output, errors = [], []
    for row in chunk:
        outcome = next(outcomes) if row.text is not None else None
        reason = row.error or (outcome.error if outcome else None)
        summary.rows += 1
        if outcome is not None:
            summary.memory_hits += outcome.memory_hits
            summary.memory_misses += outcome.memory_misses
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


class _Job:
    """One run of a job over its locked files."""

    def __init__(self, paths: JobPaths, progress: Progress, out: _Appender, err: _Appender,
                 checkpoint: Checkpoint):
        self.paths, self.progress, self.out, self.err = paths, progress, out, err
        self.checkpoint = checkpoint
        self.summary = JobSummary(paths.output, paths.errors, **progress.counts)

    def commit(self, offset: int, line: int) -> None:
        self.progress.output_offset, self.progress.errors_offset = self.out.sync(), self.err.sync()
        self.checkpoint("before_progress")
        self.progress.input_offset, self.progress.next_line = offset, line
        self.progress.counts = self.summary.counts()
        save_progress(self.paths.progress, self.progress)
        self.checkpoint("after_progress")

    def run(self, reader, writer, runner: ChunkRunner, chunk_rows: int, quiet: bool) -> None:
        if self.progress.output_offset == 0:
            self.out.write(writer.header())
            self.commit(self.progress.input_offset, self.progress.next_line)
        display = ProgressDisplay(self.paths.input.stat().st_size, self.progress.input_offset, self.summary.rows,
                                  quiet)
        last_end = [self.progress.input_offset]  # where the chunk being worked on starts

        def report(chunk: list[InputRow], share: float) -> None:
            start, end = last_end[0], chunk[-1].end_offset
            display.update(start + int((end - start) * share), self.summary.rows + share * len(chunk))

        try:
            with open(self.paths.input, "rb") as source:
                source.seek(self.progress.input_offset)
                rows = reader.rows(source, self.progress.input_offset, self.progress.next_line)
                for chunk, outcomes in runner.run(_chunks(rows, chunk_rows), report):
                    self.write_chunk(chunk, outcomes, writer)
                    last_end[0] = chunk[-1].end_offset
                    display.update(last_end[0], self.summary.rows)
        finally:
            display.close()

    def write_chunk(self, chunk: list[InputRow], outcomes: list[Outcome], writer) -> None:
        output, errors = _render_chunk(chunk, outcomes, writer, self.summary)
        half = len(output) // 2
        self.out.write(output[:half])
        self.out.file.flush()
        self.checkpoint("mid_chunk")  # part of a chunk on disk, its progress not recorded
        self.out.write(output[half:])
        self.err.write(errors)
        last = chunk[-1]
        self.commit(last.end_offset, last.line + max(1, last.raw.count(b"\n")))


def _in_process(make_worker: Callable[[], Worker], key: str) -> InProcess:
    return InProcess(make_worker)


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def run_job(paths: JobPaths, reader, writer, options: dict, make_worker: Callable[[], Worker], *,
            chunk_rows: int, restart: bool = False, quiet: bool = False, checkpoint: Checkpoint = no_checkpoint,
            runner: Callable[[Callable[[], Worker], str], ChunkRunner] | None = None) -> JobSummary:
    """Run (or resume) one job: every input row ends in the output or the errors file, once.

    `runner(make_worker, key)` says where chunks run (default: in this process); `key` names the
    job's models, so a cluster's workers keep them loaded between chunks.
    """
    if chunk_rows < 1:
        raise JobError("--chunk-rows must be at least 1")
    job = fingerprint(paths, options)
    existed = {path: path.exists() for path in (paths.output, paths.errors)}
    # The output is locked before anything else is decided or loaded: a second job on it stops here.
    out = _Appender(paths.output)
    err = progress = run = None
    try:
        err = _Appender(paths.errors)
        progress = start_or_resume(paths, job, reader, restart, existed)
        if progress.finished:
            if not existed[paths.errors]:  # opening it to lock it made it again: a finished job had none
                paths.errors.unlink(missing_ok=True)
            return JobSummary(paths.output, paths.errors, **progress.counts, already_complete=True)
        out.cut(progress.output_offset)
        err.cut(progress.errors_offset)
        started = time.monotonic()
        run = _Job(paths, progress, out, err, checkpoint)
        key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()
        with (runner or _in_process)(make_worker, key) as chunks:
            run.run(reader, writer, chunks, chunk_rows, quiet)
    except Exception:
        # A job that stops before its first row (a model that fails to load, a refused job) leaves
        # no empty files and no record behind; one with rows committed is resumed by the next run.
        if progress is None:
            _remove(*[path for path, there in existed.items() if not there])
        elif progress.counts["rows"] == 0:
            _remove(paths.output, paths.errors, paths.progress)
        raise
    finally:
        out.close()
        if err is not None:
            err.close()
    progress.finished = True
    save_progress(paths.progress, progress)
    if progress.errors_offset == 0:  # no row failed: no errors file (held open, locked, until now)
        paths.errors.unlink(missing_ok=True)
    run.summary.seconds = time.monotonic() - started
    return run.summary

