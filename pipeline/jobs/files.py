"""Rows in, rows out: the file formats of batch jobs (.txt, .jsonl, .csv, .tsv).

Input is read in binary and decoded row by row, so one bad byte sequence costs only its row, and
every row carries the byte offset just past it: a job resumes by seeking there. A CSV record may
span several lines (a newline inside a quoted field); `_csv_record_ends` follows the csv module's
quoting rules over the raw bytes to find where each record ends, so offsets stay exact for CSV too.

Writers turn a row and what the job made of it into the bytes of the output file; runner.py decides
when those bytes are written and committed.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from pipeline.errors import JobError

INPUT_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv"}
DELIMITERS = {"csv": ",", "tsv": "\t"}
BOM = b"\xef\xbb\xbf"


@dataclass
class InputRow:
    line: int  # 1-based number of the row's first line in the input file
    end_offset: int  # byte offset just past the row: where a resumed job continues
    raw: bytes
    text: str | None = None  # what the job works on; None for a blank row or a bad one
    record: dict = field(default_factory=dict)  # the row's own fields (JSONL object, CSV columns)
    error: str | None = None  # why the row is bad, for the errors file
    blank: bool = False  # an empty line: kept empty in .txt output, skipped elsewhere


@dataclass
class Outcome:
    """What a job made of one good row."""
    line: str = ""  # the .txt output line
    added: dict = field(default_factory=dict)  # fields added to the row's record (JSONL/CSV output)
    copied: bool = False  # already in the target language: copied, no model ran
    error: str | None = None  # the row failed after all (e.g. a language not asked for)
    # Sentences the chunk found in the translation memory / translated anew: on its first row only.
    memory_hits: int = 0
    memory_misses: int = 0


def input_format(path: Path) -> str:
    fmt = INPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise JobError(f"{path}: unknown input type '{path.suffix}'; use .txt, .jsonl, .csv or .tsv")
    return fmt


def _decode(raw: bytes) -> str:
    """The row's text without its line ending; UnicodeDecodeError for invalid UTF-8."""
    return raw.decode("utf-8").rstrip("\r\n") if raw.endswith(b"\n") else raw.decode("utf-8")


def _bad_utf8(error: UnicodeDecodeError) -> str:
    return f"invalid UTF-8 at byte {error.start} of the row"


def _lines(f: BinaryIO, offset: int, line: int) -> Iterator[tuple[int, int, bytes]]:
    """(line number, end offset, raw line) from `offset` on."""
    for raw in f:
        offset += len(raw)
        yield line, offset, raw
        line += 1


def _decoded_lines(f: BinaryIO, offset: int, line: int) -> Iterator[tuple[InputRow, str | None]]:
    """Each line as a row and its text (a leading BOM dropped); None, with the row's error set,
    where the line is not valid UTF-8."""
    for number, end, raw in _lines(f, offset, line):
        row = InputRow(number, end, raw)
        try:
            text = _decode(raw[len(BOM):] if offset == 0 and number == 1 and raw.startswith(BOM) else raw)
        except UnicodeDecodeError as error:
            row.error, text = _bad_utf8(error), None
        yield row, text


class TxtReader:
    """One text per line; an empty (or blank) line is a blank row."""

    header_end, first_line = 0, 1

    def __init__(self, path: Path, key: str):
        self.path = path

    def rows(self, f: BinaryIO, offset: int, line: int) -> Iterator[InputRow]:
        for row, text in _decoded_lines(f, offset, line):
            if text is not None:
                row.blank = not text.strip()
                row.text = None if row.blank else text
            yield row


class JsonlReader:
    """One JSON object per line; the text is in field `key`. Empty lines are skipped."""

    header_end, first_line = 0, 1

    def __init__(self, path: Path, key: str):
        self.key = key

    def rows(self, f: BinaryIO, offset: int, line: int) -> Iterator[InputRow]:
        for row, source in _decoded_lines(f, offset, line):
            if source is not None and not source.strip():
                row.blank = True
            elif source is not None:
                self._parse(row, source)
            yield row

    def _parse(self, row: InputRow, source: str) -> None:
        try:
            record = json.loads(source)
        except json.JSONDecodeError as error:
            row.error = f"invalid JSON: {error.msg} at column {error.colno}"
            return
        if not isinstance(record, dict):
            row.error = f"not a JSON object but {_json_type(record)}"
            return
        row.record = record
        row.error, row.text = _text_of(record, self.key, "field")


def _json_type(value) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _text_of(record: dict, key: str, kind: str) -> tuple[str | None, str | None]:
    """(error, text) for the text under `key`."""
    if key not in record:
        return f"no {kind} '{key}'", None
    value = record[key]
    if not isinstance(value, str):
        return f"{kind} '{key}' is not a string but {_json_type(value)}", None
    if not value.strip():
        return f"{kind} '{key}' is empty", None
    return None, value


# States of the CSV record scanner; they follow the csv module's (non-strict, doublequote) parser.
FIELD_START, UNQUOTED, QUOTED, QUOTE_IN_QUOTED = range(4)


def _csv_scan(raw: bytes, state: int, delimiter: int) -> int:
    """The scanner state after `raw` (one physical line, its newline excluded)."""
    quote = 0x22
    for byte in raw:
        if state == QUOTED:
            state = QUOTE_IN_QUOTED if byte == quote else QUOTED
        elif byte == delimiter:
            state = FIELD_START
        elif state == FIELD_START:
            state = QUOTED if byte == quote else UNQUOTED
        elif state == QUOTE_IN_QUOTED:
            state = QUOTED if byte == quote else UNQUOTED
    return state


def _csv_records(f: BinaryIO, offset: int, line: int, delimiter: str) -> Iterator[tuple[int, int, bytes]]:
    """(first line number, end offset, raw record): a record ends at a newline outside quotes."""
    parts: list[bytes] = []
    first, state, delim = line, FIELD_START, ord(delimiter)
    for number, end, raw in _lines(f, offset, line):
        if not parts:
            first, state = number, FIELD_START
        parts.append(raw)
        # Fast path: a line without quotes cannot open or close a quoted field.
        if b'"' in raw or state == QUOTED:
            state = _csv_scan(raw.rstrip(b"\r\n"), state, delim)
        if state != QUOTED:
            yield first, end, b"".join(parts)
            parts = []
    if parts:  # a quote left open at the end of the file
        yield first, end, b"".join(parts)


class CsvReader:
    """A header row, then one record per row; the text is in column `key`. Empty lines are skipped."""

    def __init__(self, path: Path, key: str, fmt: str = "csv"):
        self.key = key
        self.delimiter = DELIMITERS[fmt]
        self.header, self.header_end, self.newline, self.first_line = self._read_header(path)
        if key not in self.header:
            raise JobError(f"{path} has no column '{key}' (columns: {', '.join(self.header)}); use --column")

    def _read_header(self, path: Path) -> tuple[list[str], int, str, int]:
        with open(path, "rb") as f:
            for _, end, raw in _csv_records(f, 0, 1, self.delimiter):
                try:
                    fields = self._fields(raw.removeprefix(BOM))
                except (UnicodeDecodeError, ValueError) as error:
                    raise JobError(f"{path}: the header row cannot be read ({error})") from None
                newline = "\r\n" if raw.endswith(b"\r\n") else "\n"
                return fields, end, newline, raw.count(b"\n") + 1
        raise JobError(f"{path} is empty: a CSV input needs a header row")

    def _fields(self, raw: bytes) -> list[str]:
        rows = list(csv.reader(io.StringIO(_decode(raw), newline=""), delimiter=self.delimiter))
        if len(rows) != 1:
            raise ValueError(f"the record holds {len(rows)} rows")
        return rows[0]

    def rows(self, f: BinaryIO, offset: int, line: int) -> Iterator[InputRow]:
        for number, end, raw in _csv_records(f, offset, line, self.delimiter):
            row = InputRow(number, end, raw)
            if not raw.strip():
                row.blank = True
            else:
                self._parse(row)
            yield row

    def _parse(self, row: InputRow) -> None:
        try:
            values = self._fields(row.raw)
        except UnicodeDecodeError as error:
            row.error = _bad_utf8(error)
            return
        except (ValueError, csv.Error) as error:
            row.error = f"unreadable CSV row: {error}"
            return
        if len(values) != len(self.header):
            fields = f"{len(values)} field" + ("" if len(values) == 1 else "s")
            row.error = f"the row has {fields}; the header has {len(self.header)}"
            return
        row.record = dict(zip(self.header, values))
        row.error, row.text = _text_of(row.record, self.key, "column")


def open_reader(path: Path, fmt: str, key: str):
    if fmt in DELIMITERS:
        return CsvReader(path, key, fmt)
    return {"txt": TxtReader, "jsonl": JsonlReader}[fmt](path, key)


class TxtWriter:
    """One output line per input line: blank and failed rows stay empty, so lines stay aligned."""

    def header(self) -> bytes:
        return b""

    def row(self, row: InputRow, outcome: Outcome | None) -> bytes:
        text = "" if outcome is None or outcome.error else outcome.line
        # A line break inside a translation would shift every later line. Each line ends as its
        # input line did (CRLF stays CRLF), so the output diffs cleanly against the input.
        ending = "\r\n" if row.raw.endswith(b"\r\n") else "\n"
        return (" ".join(text.splitlines()) + ending).encode("utf-8")


class JsonlWriter:
    """The input object with the added fields (which replace input fields of the same name)."""

    def __init__(self, base_field: str | None = None):
        self.base_field = base_field  # for .txt input: the name under which the line is kept

    def header(self) -> bytes:
        return b""

    def row(self, row: InputRow, outcome: Outcome | None) -> bytes:
        if outcome is None or outcome.error or row.blank:
            return b""
        record = {self.base_field: row.text} if self.base_field else dict(row.record)
        record.update(outcome.added)
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


class CsvWriter:
    """The input columns with the added ones (an added column already in the header is replaced)."""

    def __init__(self, reader: CsvReader, added: list[str]):
        self.columns = reader.header + [name for name in added if name not in reader.header]
        self.delimiter = reader.delimiter
        self.newline = reader.newline

    def _encode(self, values: list[str]) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer, delimiter=self.delimiter, lineterminator=self.newline).writerow(values)
        return buffer.getvalue().encode("utf-8")

    def header(self) -> bytes:
        return self._encode(self.columns)

    def row(self, row: InputRow, outcome: Outcome | None) -> bytes:
        if outcome is None or outcome.error or row.blank:
            return b""
        record = {**row.record, **outcome.added}
        return self._encode([str(record.get(name, "")) for name in self.columns])


def error_record(row: InputRow, reason: str) -> bytes:
    """One line of the errors file: where, why, and the row as it was (bad bytes escaped)."""
    raw = row.raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
    return (json.dumps({"line": row.line, "reason": reason, "raw": raw}, ensure_ascii=False) + "\n").encode("utf-8")
