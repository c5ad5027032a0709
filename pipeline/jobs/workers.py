"""The two jobs over files: translate every row (`translate_file`), answer every question (`ask_file`).

Each job is a reader and a writer of its file format (files.py), a worker that turns a chunk of
texts into outcomes, and the durable runner (runner.py). Jobs do not import the pipeline: they get
a loader (`load_translator`, `load_qa`) that makes a duck-typed Translator or BilingualQA when there
is work, and `options`, the caller's description of the models, for the job's fingerprint. With
`workers` or `cluster`, chunks run on a Dask cluster (cluster.py): the loader is then sent to each
worker, so it must be a picklable recipe (a module-level function or a partial), not a loaded model.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Protocol

from pipeline.errors import BilingualQAError, JobError
from pipeline.jobs.files import CsvWriter, JsonlWriter, Outcome, TxtWriter, input_format, open_reader
from pipeline.jobs.runner import Checkpoint, JobPaths, JobSummary, Report, no_checkpoint, run_job
from pipeline.spec import ASK_CHUNK_ROWS, TRANSLATE_CHUNK_ROWS, GenerationSettings
from pipeline.text.detect import SUPPORTED_LANGUAGES, detect_language, other_language
ASK_BATCH_ROWS = 32  # questions per LLM batch where the answer stage names no better size


class Translator(Protocol):
    """What a translation job needs of mt/translator.py's Translator (jobs import no stage: the
    stages hand themselves to jobs, see docs/design.md)."""

    memory: object  # its translation memory, or None; only one that keeps a file is counted

    def translate(self, texts: list[str]) -> list[str]: ...


class BilingualQA(Protocol):
    """What an answer job needs of qa.py's BilingualQA."""

    ja_en: Translator | None  # None where the stages run elsewhere (a server)
    en_ja: Translator | None

    def ask_batch(self, texts: list[str], *, source_lang: str | None, settings: GenerationSettings) -> list: ...


def _takes_progress(function) -> bool:
    try:
        return "progress" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def memory_counts(translators: list) -> tuple[int, int]:
    """(hits, misses) of the translators' memory files so far; a translator not loaded yet counts
    none, nor does one without a file (its in-process memory's hits are a job's repeated sentences,
    which a summary line about "translation memory" would misreport as found in a memory)."""
    memories = [memory for memory in (getattr(translator, "memory", None) for translator in translators)
                if getattr(memory, "persistent", False)]  # a job's translator may be any translate(texts)
    return sum(m.hits for m in memories), sum(m.misses for m in memories)


def with_memory_counts(outcomes: list[Outcome], before: tuple[int, int], after: tuple[int, int]) -> list[Outcome]:
    """The chunk's outcomes, its first row carrying the memory's counts for the chunk (the summary
    adds them up: the driver never sees a worker's translator)."""
    hits, misses = after[0] - before[0], after[1] - before[1]
    if outcomes and (hits or misses):
        outcomes = [replace(outcomes[0], memory_hits=hits, memory_misses=misses), *outcomes[1:]]
    return outcomes


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

    def __call__(self, texts: list[str], report: Report | None = None) -> list[Outcome]:
        languages: list[str | BilingualQAError] = []
        for text in texts:
            try:
                languages.append(self.language(text))
            except BilingualQAError as error:
                languages.append(error)
        todo = [i for i, language in enumerate(languages) if language == other_language(self.target_lang)]
        before = memory_counts([self._translator])
        translated = dict(zip(todo, self.translate([texts[i] for i in todo], report)))
        outcomes = [self.outcome(text, languages[i], translated.get(i)) for i, text in enumerate(texts)]
        return with_memory_counts(outcomes, before, memory_counts([self._translator]))

    def translate(self, texts: list[str], report: Report | None = None) -> list[str | BilingualQAError]:
        """The whole chunk in one call (the Translator sorts and batches it); should a row be
        refused, the others are translated one by one so that only it fails."""
        if not texts:
            return []
        translator = self.translator  # a model that fails to load stops the job: it is no row's fault
        try:
            if report is not None and _takes_progress(translator.translate):
                return list(translator.translate(texts, progress=lambda done, total: report(done / max(total, 1))))
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


def _chunk_runner(workers: int | str | None, cluster: str | None):
    """Where the chunks run: here (None: one worker, the default), or on a Dask cluster, local or at
    `cluster`. `auto` is one worker per GPU, so on a machine without one the job runs here."""
    from pipeline.jobs.cluster import dask_runner, worker_count

    if cluster is None and (workers is None or worker_count(workers) == 1):  # None: no GPU count asked
        return None

    return dask_runner(workers, cluster)


def check_languages(to: str, source_lang: str = "auto") -> None:
    """A translation job's languages (every file and document job's one check): into ja or en, from
    the other or auto."""
    if to not in SUPPORTED_LANGUAGES or source_lang not in SUPPORTED_LANGUAGES + ("auto",):
        raise JobError("translate between ja and en: --to ja|en, --from ja|en|auto")
    if source_lang == to:
        raise JobError(f"--from {source_lang} and --to {to} are the same language")


def check_translation_job(input: str | Path, output: str | Path, to: str, source_lang: str = "auto",
                          errors: str | Path | None = None) -> JobPaths:
    """The job's files and languages, refused before anything loads (the CLI calls it first)."""
    check_languages(to, source_lang)
    paths = JobPaths.of(input, output, errors)
    input_format(paths.input)
    if paths.output.suffix.lower() != paths.input.suffix.lower():
        raise JobError(f"the output must be a {paths.input.suffix} file like the input")
    return paths


def translate_file(input: str | Path, output: str | Path, *, to: str, load_translator: Callable[[], "Translator"],
                   options: dict, source_lang: str = "auto", field: str = "text", errors: str | Path | None = None,
                   restart: bool = False, quiet: bool = False, chunk_rows: int = TRANSLATE_CHUNK_ROWS,
                   workers: int | str | None = None, cluster: str | None = None,
                   checkpoint: Checkpoint = no_checkpoint) -> JobSummary:
    """Translate every row of a .txt/.jsonl/.csv/.tsv file into `to`; the output has the input's format.

    `load_translator` is called only if there is work to do; `options` (everything that affects the
    output: model, beams...) goes into the job's fingerprint.
    """
    paths = check_translation_job(input, output, to, source_lang, errors)
    fmt = input_format(paths.input)
    reader = open_reader(paths.input, fmt, field)
    added = ["translation"] + (["source_lang"] if source_lang == "auto" else [])
    writer = {"txt": TxtWriter(), "jsonl": JsonlWriter()}.get(fmt) or CsvWriter(reader, added)
    job_options = {"command": "translate", "to": to, "from": source_lang, "field": field,
                   "chunk_rows": chunk_rows, **options}
    return run_job(paths, reader, writer, job_options,
                   functools.partial(TranslationWorker, load_translator, source_lang, to),
                   chunk_rows=chunk_rows, restart=restart, quiet=quiet, checkpoint=checkpoint,
                   runner=_chunk_runner(workers, cluster))


class AnswerWorker:
    """Questions answered in LLM batches of the answer stage's preferred size, similar lengths together."""

    def __init__(self, qa: "BilingualQA", source_lang: str | None, settings: GenerationSettings):
        self.qa, self.source_lang, self.settings = qa, source_lang, settings
        self.batch_rows = getattr(qa, "preferred_batch_rows", ASK_BATCH_ROWS)

    def __call__(self, texts: list[str], report: Report | None = None) -> list[Outcome]:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        outcomes: list[Outcome] = [Outcome()] * len(texts)
        before = memory_counts([self.qa.ja_en, self.qa.en_ja])
        for start in range(0, len(order), self.batch_rows):
            group = order[start:start + self.batch_rows]
            results = self.qa.ask_batch([texts[i] for i in group], source_lang=self.source_lang,
                                        settings=self.settings)
            for i, result in zip(group, results):
                outcomes[i] = self.outcome(result)
            if report is not None:
                report((start + len(group)) / len(texts))
        return with_memory_counts(outcomes, before, memory_counts([self.qa.ja_en, self.qa.en_ja]))

    @staticmethod
    def outcome(result) -> Outcome:
        if isinstance(result, BilingualQAError):
            return Outcome(error=str(result))
        fields = result.to_dict()
        # Stage timings belong to a whole batch, not to one question, and would make two runs of
        # the same job differ; the summary gives the job's time instead.
        fields.pop("timings", None)
        return Outcome(added=fields)


def answer_worker(load_qa: Callable[[], "BilingualQA"], source_lang: str | None,
                  settings: GenerationSettings) -> AnswerWorker:
    """The models load here, once per process that runs chunks."""
    return AnswerWorker(load_qa(), source_lang, settings)


def ask_file(input: str | Path, output: str | Path, *, load_qa: Callable[[], "BilingualQA"], options: dict,
             source_lang: str | None = None, settings: GenerationSettings = GenerationSettings(),
             field: str = "text", errors: str | Path | None = None, restart: bool = False,
             quiet: bool = False, chunk_rows: int = ASK_CHUNK_ROWS, workers: int | str | None = None,
             cluster: str | None = None, checkpoint: Checkpoint = no_checkpoint) -> JobSummary:
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
    return run_job(paths, reader, writer, job_options, functools.partial(answer_worker, load_qa, source_lang, settings),
                   chunk_rows=chunk_rows, restart=restart, quiet=quiet, checkpoint=checkpoint,
                   runner=_chunk_runner(workers, cluster))
