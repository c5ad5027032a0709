"""The data file -> English question/answer pairs, as a resumable job (jobs/runner.py's `run_job`).

phi-2 is taught in English, so each side of a pair is detected as `ask` detects a question and a
Japanese side is translated by the pipeline's own ja->en translator. The English pairs are written
beside the adapter (`OUTPUT.pairs.jsonl`) by the job runner, chunk by chunk and fsynced: a run that
dies while translating goes on where it stopped, and a finished file is reused by every rerun. A
rerun whose options changed (a new --max-length) starts the file over, but takes the translations
it already holds (`known_translations`): no sentence is translated twice.

A bad row (no question or answer, empty, invalid JSON or UTF-8, another language than Japanese or
English, longer than --max-length with its prompt) goes to the errors file with its line number and
reason, as in every job; the rest trains. The job runner hands its worker text: each pair travels
to the worker as a JSON array `[question, answer]`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from pipeline.errors import BilingualQAError, JobError
from pipeline.jobs.files import DELIMITERS, InputRow, Outcome, input_format, open_reader
from pipeline.jobs.runner import Checkpoint, JobPaths, JobSummary, Report, no_checkpoint, run_job
from pipeline.llm.prompt import prompt_ids
from pipeline.text.detect import detect_language

PAIR_CHUNK_ROWS = 256  # pairs per committed chunk: what a crash while translating can cost
INSTRUCTION_LAYOUT = ("instruction", "output", "input")  # the common instruction-tuning layout


@dataclass(frozen=True)
class Layout:
    """Where a record keeps its question and answer (`context`: the instruction layout's `input`,
    added to the question below the instruction)."""

    question: str = "question"
    answer: str = "answer"
    context: str | None = None

    def describe(self) -> dict:
        return {"question": self.question, "answer": self.answer, "context": self.context}


@dataclass(frozen=True)
class Pair:
    line: int  # the row's line in the data file
    question: str  # English
    answer: str  # English


def _first_record_keys(path: Path, fmt: str) -> list[str]:
    """The CSV header, or the keys of the first JSON object of a .jsonl file (a peek: the job's
    reader reads every row properly)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        if fmt in DELIMITERS:
            return next(csv.reader(f, delimiter=DELIMITERS[fmt]), [])
        for number, line in enumerate(f):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                return list(record)
            if number > 1000:
                break
    return []


def find_layout(path: Path, question_field: str | None, answer_field: str | None) -> Layout:
    """The fields named, else `question`/`answer`, else the instruction/input/output layout where the
    file has `instruction` and `output` but no `question`. A CSV without the columns is refused."""
    fmt = input_format(path)
    if fmt == "txt":
        raise JobError(f"{path}: a .txt file holds no pairs; use .jsonl, .csv or .tsv with question and answer "
                       "fields")
    keys = _first_record_keys(path, fmt)
    if question_field or answer_field:
        layout = Layout(question_field or "question", answer_field or "answer")
    elif "question" not in keys and {INSTRUCTION_LAYOUT[0], INSTRUCTION_LAYOUT[1]} <= set(keys):
        layout = Layout(*INSTRUCTION_LAYOUT)
    else:
        layout = Layout()
    if fmt in DELIMITERS:
        for key, option in ((layout.question, "--question-field"), (layout.answer, "--answer-field")):
            if key not in keys:
                raise JobError(f"{path} has no column '{key}' (columns: {', '.join(keys) or 'none'}); use {option}")
    return layout


def _side_of(record: dict, key: str, kind: str) -> tuple[str | None, str | None]:
    """(error, text) of one side of the pair, worded as the job readers word the text's field."""
    if key not in record:
        return f"no {kind} '{key}'", None
    value = record[key]
    if not isinstance(value, str):
        return f"{kind} '{key}' is not a string", None
    if not value.strip():
        return f"{kind} '{key}' is empty", None
    return None, value


class PairReader:
    """The rows of a .jsonl/.csv/.tsv file (jobs/files.py's readers: byte offsets, one bad UTF-8
    sequence costing one row), each good one's text the pair as a JSON array."""

    def __init__(self, path: Path, layout: Layout):
        self.fmt = input_format(path)
        self.inner = open_reader(path, self.fmt, layout.question)
        self.layout = layout
        self.header_end, self.first_line = self.inner.header_end, self.inner.first_line

    def rows(self, f: BinaryIO, offset: int, line: int) -> Iterator[InputRow]:
        for row in self.inner.rows(f, offset, line):
            if row.text is not None:
                self._pair(row)
            yield row

    def _pair(self, row: InputRow) -> None:
        kind = "column" if self.fmt in DELIMITERS else "field"
        error, answer = _side_of(row.record, self.layout.answer, kind)
        if error:
            row.error, row.text = error, None
            return
        question = row.text.strip()
        context = row.record.get(self.layout.context) if self.layout.context else None
        if isinstance(context, str) and context.strip():
            question = f"{question}\n\n{context.strip()}"
        row.text = json.dumps([question, answer.strip()], ensure_ascii=False)


class PairWriter:
    """One JSON object per usable pair: its line, the English question and answer, the languages
    found, and the Japanese originals with the translator that turned them into English."""

    def header(self) -> bytes:
        return b""

    def row(self, row: InputRow, outcome: Outcome | None) -> bytes:
        if outcome is None or outcome.error or row.blank:
            return b""
        return (json.dumps({"line": row.line, **outcome.added}, ensure_ascii=False) + "\n").encode("utf-8")


def side_language(text: str, side: str) -> str:
    """"ja" or "en" (text without letters, such as a number, is kept as it is: "en"); a
    BilingualQAError for another language."""
    language = detect_language(text)
    if language in ("ja", "en", "unknown"):
        return "en" if language == "unknown" else language
    raise BilingualQAError(f"the {side} looks like '{language}': finetune takes Japanese or English pairs")


class PairWorker:
    """A chunk of pairs -> their English records: Japanese sides translated together in one call
    (the translator loaded at the first one; `known` translations reused), every pair measured in
    tokens with its prompt against `max_length`."""

    def __init__(self, load_translator: Callable[[], object], tokenizer, max_length: int, mt_key: str,
                 known: dict[str, str] | None = None):
        self.load_translator, self.translator = load_translator, None
        self.tokenizer, self.max_length, self.mt_key = tokenizer, max_length, mt_key
        self.known = dict(known or {})

    def __call__(self, texts: list[str], report: Report | None = None) -> list[Outcome]:
        pairs = [json.loads(text) for text in texts]
        languages: list[list[str] | BilingualQAError] = []
        for question, answer in pairs:
            try:
                languages.append([side_language(question, "question"), side_language(answer, "answer")])
            except BilingualQAError as error:
                languages.append(error)
        japanese = sorted({side for pair, langs in zip(pairs, languages) if not isinstance(langs, BilingualQAError)
                           for side, lang in zip(pair, langs) if lang == "ja" and side not in self.known})
        self.known.update(self.translate(japanese))
        return [self.outcome(pair, langs) for pair, langs in zip(pairs, languages)]

    def translate(self, texts: list[str]) -> dict[str, str | BilingualQAError]:
        """The English of each text; should the translator refuse one, the others go one by one."""
        if not texts:
            return {}
        if self.translator is None:  # a file in English loads no translator
            self.translator = self.load_translator()
        try:
            return dict(zip(texts, self.translator.translate(texts)))
        except BilingualQAError:
            if len(texts) == 1:
                raise
        return {text: self._translate_one(text) for text in texts}

    def _translate_one(self, text: str) -> str | BilingualQAError:
        try:
            return self.translator.translate([text])[0]
        except BilingualQAError as error:
            return error

    def outcome(self, pair: list[str], languages) -> Outcome:
        if isinstance(languages, BilingualQAError):
            return Outcome(error=str(languages))
        english, original = [], {}
        for side, text, language in zip(("question", "answer"), pair, languages):
            if language == "en":
                english.append(text)
                continue
            translated = self.known.get(text)
            if isinstance(translated, BilingualQAError):
                return Outcome(error=f"the {side} could not be translated: {translated}")
            if not translated or not translated.strip():
                return Outcome(error=f"the Japanese {side} translated to nothing")
            english.append(translated.strip())
            original[side] = text
        tokens = len(prompt_ids(self.tokenizer, english[0])) + len(answer_ids(self.tokenizer, english[1])) + 1
        if tokens > self.max_length:
            return Outcome(error=f"the pair is {tokens} tokens long with its prompt; --max-length is {self.max_length}")
        record = {"question": english[0], "answer": english[1], "languages": list(languages)}
        if original:
            record.update(original=original, mt=self.mt_key)
        return Outcome(line=english[0], added=record)


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The answer's token ids as phi-2 writes them after the prompt's `Output:`: a space, then the
    text (the end-of-text id is added by the caller)."""
    return list(tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"])


def known_translations(pairs_file: Path, mt_key: str) -> dict[str, str]:
    """The Japanese -> English translations an earlier run wrote into `pairs_file` with the same
    translator (`mt_key`): a restarted preparation translates none of them again."""
    known: dict[str, str] = {}
    try:
        lines = pairs_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return known
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line a crash cut short
            continue
        if isinstance(record, dict) and record.get("mt") == mt_key:
            for side, text in (record.get("original") or {}).items():
                if isinstance(record.get(side), str):
                    known[text] = record[side]
    return known


def prepare_pairs(data: Path, pairs_file: Path, errors_file: Path, layout: Layout, options: dict,
                  make_worker: Callable[[], PairWorker], *, restart: bool, quiet: bool,
                  checkpoint: Checkpoint = no_checkpoint) -> JobSummary:
    """Run (or resume, or find complete) the job that writes `pairs_file` from `data`."""
    paths = JobPaths.of(data, pairs_file, errors_file)
    return run_job(paths, PairReader(data, layout), PairWriter(), options, make_worker,
                   chunk_rows=PAIR_CHUNK_ROWS, restart=restart, quiet=quiet, checkpoint=checkpoint)


def read_pairs(pairs_file: Path) -> list[Pair]:
    """The usable pairs of a finished preparation, in the data file's order."""
    pairs = []
    with open(pairs_file, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            pairs.append(Pair(record["line"], record["question"], record["answer"]))
    return pairs
