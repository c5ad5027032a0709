"""Batch jobs through the Python API: formats, bad rows, and exactly-once resume after crashes."""

from __future__ import annotations

import csv
import io
import json

import pytest

from pipeline import GenerationSettings, Translator
from pipeline.jobs import workers as jobs
from pipeline.errors import JobError

from crashes import Crash, crash_at  # tests/jobs/crashes.py

JAPANESE = [
    "金利が上がると、人や企業にとって借り入れの費用が高くなります。",
    "インフレとは何ですか、そしてなぜ重要なのですか？",
    "円安は日本の輸出品を海外で安くします。",
    "これはペンです。私は学生です。",
    "東京の株式市場は午後に少し下がりました。",
    "予算は収入、支出、そして残った残高を示します。",
    "ローンとリースの違いを説明してください。",
]
ENGLISH = ["The quick brown fox jumps over the lazy dog.", "Stocks represent a share of ownership in a company."]


@pytest.fixture(scope="module")
def ja_en(tiny_ja_en_dir):
    return Translator.from_pretrained(str(tiny_ja_en_dir), device="cpu", backend="transformers", num_beams=1)


def many_rows(count: int) -> list[str]:
    """Japanese rows (some of two sentences), an English row and a blank line now and then."""
    rows = []
    for i in range(count):
        if i % 9 == 4:
            rows.append(ENGLISH[i % 2])
        elif i % 11 == 7:
            rows.append("")
        else:
            rows.append(JAPANESE[i % 7] + (JAPANESE[(i + 3) % 7] if i % 3 == 0 else ""))
    return rows


def write_input(tmp_path, fmt: str, rows: list[str]):
    path = tmp_path / f"input.{fmt}"
    if fmt == "txt":
        path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": row, "note": "引用 \"q\""}, ensure_ascii=False) + "\n"
                                for i, row in enumerate(rows) if row), encoding="utf-8")
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter="," if fmt == "csv" else "\t")
        writer.writerow(["id", "text", "note"])
        for i, row in enumerate(rows):
            if row:  # every third row holds a line break inside a quoted field
                writer.writerow([i, row.replace("。", "。\n", 1) if i % 3 == 0 else row, f'say "hi", {i}'])
        path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    return path


def translate(translator, source, output, checkpoint=None, **kwargs):
    """Through the API method; with a checkpoint, through the job function with the same options."""
    if checkpoint is None:
        return translator.translate_file(source, output, quiet=True, **kwargs)
    return jobs.translate_file(source, output, to=translator.target_lang, load_translator=lambda: translator,
                               options=translator.job_options(), quiet=True, checkpoint=checkpoint, **kwargs)


def files_of(output):
    """The output's bytes and its errors file's (None where there is none: no row failed)."""
    errors = output.with_name(output.name + ".errors.jsonl")
    return output.read_bytes(), errors.read_bytes() if errors.exists() else None


def test_txt_output_is_aligned_line_by_line_and_blank_lines_stay_blank(ja_en, tmp_path):
    rows = many_rows(30)
    summary = translate(ja_en, write_input(tmp_path, "txt", rows), tmp_path / "out.txt")
    lines = (tmp_path / "out.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(rows)
    for row, line in zip(rows, lines):
        if not row:
            assert line == ""
        elif row in ENGLISH:
            assert line == row  # already English: copied as it is
        else:
            assert line and line != row
    assert summary.rows == 30 and summary.blank == rows.count("") and summary.failed == 0
    assert summary.copied == sum(row in ENGLISH for row in rows)


def test_translations_match_translating_the_rows_in_memory(ja_en, tmp_path):
    rows = JAPANESE * 2
    translate(ja_en, write_input(tmp_path, "txt", rows), tmp_path / "out.txt", source_lang="ja", chunk_rows=5)
    assert (tmp_path / "out.txt").read_text(encoding="utf-8").splitlines() == ja_en.translate(rows)


def test_jsonl_keeps_every_input_field_and_adds_translation_and_source_lang(ja_en, tmp_path):
    source = tmp_path / "in.jsonl"
    records = [{"id": 1, "text": JAPANESE[0], "meta": {"tags": ["経済", "🙂"], "score": 2.5, "ok": None}},
               {"text": ENGLISH[0], "quote": "she said \"hi\"\\n", "translation": "stale"}]
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    translate(ja_en, source, tmp_path / "out.jsonl")
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [list(o) for o in out] == [["id", "text", "meta", "translation", "source_lang"],
                                      ["text", "quote", "translation", "source_lang"]]
    assert out[0]["meta"] == records[0]["meta"] and out[1]["quote"] == records[1]["quote"]
    assert out[0]["source_lang"] == "ja" and out[0]["translation"] == ja_en.translate([JAPANESE[0]])[0]
    assert out[1]["translation"] == ENGLISH[0] and out[1]["source_lang"] == "en"


def test_jsonl_without_auto_adds_no_source_lang_and_reads_the_named_field(ja_en, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"body": JAPANESE[1]}, ensure_ascii=False) + "\n", encoding="utf-8")
    translate(ja_en, source, tmp_path / "out.jsonl", source_lang="ja", field="body")
    assert list(json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8"))) == ["body", "translation"]


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_csv_round_trip_keeps_quotes_unicode_and_embedded_newlines(ja_en, tmp_path, fmt):
    rows = [row for row in many_rows(12) if row]
    source = write_input(tmp_path, fmt, rows)
    summary = translate(ja_en, source, tmp_path / f"out.{fmt}")
    delimiter = "," if fmt == "csv" else "\t"
    with open(source, encoding="utf-8", newline="") as f:
        expected = list(csv.reader(f, delimiter=delimiter))
    with open(tmp_path / f"out.{fmt}", encoding="utf-8", newline="") as f:
        got = list(csv.reader(f, delimiter=delimiter))
    assert got[0] == expected[0] + ["translation", "source_lang"]
    assert [row[:3] for row in got[1:]] == expected[1:]
    assert any("\n" in row[1] for row in got[1:])  # the embedded line breaks survived
    assert summary.rows == len(rows) and summary.failed == 0
    for row in got[1:]:
        assert row[4] == ("en" if row[1] in ENGLISH else "ja")
        assert (row[3] == row[1]) == (row[1] in ENGLISH)


def test_csv_with_crlf_line_endings_keeps_them(ja_en, tmp_path):
    source = tmp_path / "in.csv"
    source.write_bytes('\ufeffid,text\r\n1,"二行の\r\n文です。"\r\n2,これはペンです。\r\n'.encode("utf-8"))
    translate(ja_en, source, tmp_path / "out.csv", source_lang="ja")
    out = (tmp_path / "out.csv").read_bytes()
    assert out.startswith(b"id,text,translation\r\n") and out.count(b"\r\n") >= 3
    with open(tmp_path / "out.csv", encoding="utf-8", newline="") as f:
        assert [r[:2] for r in csv.reader(f)][1:] == [["1", "二行の\r\n文です。"], ["2", "これはペンです。"]]


def read_errors(output):
    path = output.with_name(output.name + ".errors.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_kind_of_bad_jsonl_row_goes_to_the_errors_file_and_the_job_goes_on(ja_en, tmp_path):
    source = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"text": JAPANESE[0]}, ensure_ascii=False).encode(),
        b'{"text": "broken',  # invalid JSON
        b'{"id": 3}',  # missing field
        b'{"text": 42}',  # not a string
        b'{"text": "   "}',  # empty text
        '{"text": "金利\xff"}'.encode("utf-8").replace(b"\xc3\xbf", b"\xff"),  # invalid UTF-8
        json.dumps({"text": "这个问题很难吗"}, ensure_ascii=False).encode(),  # Chinese: not asked for
        b'["text"]',  # not an object
        json.dumps({"text": JAPANESE[2]}, ensure_ascii=False).encode(),
    ]
    source.write_bytes(b"\n".join(lines) + b"\n")
    summary = translate(ja_en, source, tmp_path / "out.jsonl")
    errors = read_errors(tmp_path / "out.jsonl")
    assert [e["line"] for e in errors] == [2, 3, 4, 5, 6, 7, 8]
    reasons = [e["reason"] for e in errors]
    assert reasons[0].startswith("invalid JSON") and reasons[1] == "no field 'text'"
    assert reasons[2] == "field 'text' is not a string but number" and reasons[3] == "field 'text' is empty"
    assert reasons[4].startswith("invalid UTF-8") and "'zh' not asked for" in reasons[5]
    assert reasons[6] == "not a JSON object but array"
    assert errors[4]["raw"] == '{"text": "金利\\xff"}' and errors[0]["raw"] == '{"text": "broken'
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [o["text"] for o in out] == [JAPANESE[0], JAPANESE[2]]
    assert (summary.done, summary.failed) == (2, 7)


def test_bad_csv_rows_go_to_the_errors_file(ja_en, tmp_path):
    source = tmp_path / "in.csv"
    source.write_bytes("id,text\n1,これはペンです。\n2,too,many\n3,\n4\n5,円安\xff\n6,これはペンです。\n"
                       .encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
    translate(ja_en, source, tmp_path / "out.csv", source_lang="ja")
    errors = read_errors(tmp_path / "out.csv")
    assert [(e["line"], e["reason"]) for e in errors] == [
        (3, "the row has 3 fields; the header has 2"), (4, "column 'text' is empty"),
        (5, "the row has 1 field; the header has 2"), (6, "invalid UTF-8 at byte 8 of the row")]
    assert (tmp_path / "out.csv").read_text(encoding="utf-8").count("\n") == 3  # header and two rows


def test_bad_txt_row_leaves_its_output_line_empty_so_lines_stay_aligned(ja_en, tmp_path):
    source = tmp_path / "in.txt"
    source.write_bytes("これはペンです。\n\xff\xfe\n这个问题很难吗\n円安\n".encode("utf-8")
                       .replace(b"\xc3\xbf\xc3\xbe", b"\xff\xfe"))
    translate(ja_en, source, tmp_path / "out.txt")
    lines = (tmp_path / "out.txt").read_text(encoding="utf-8").split("\n")
    assert len(lines) == 5 and lines[0] and lines[1] == "" and lines[2] == "" and lines[3]
    assert [e["line"] for e in read_errors(tmp_path / "out.txt")] == [2, 3]


CRASHES = [("mid_chunk", 1), ("mid_chunk", 3), ("before_progress", 1), ("before_progress", 4),
           ("after_progress", 2)]


@pytest.fixture(scope="module")
def uninterrupted(ja_en, tmp_path_factory):
    """Per format: an input of 24 rows (one of them bad) and its output from a run that never stopped."""
    runs = {}
    for fmt in ("txt", "csv"):
        folder = tmp_path_factory.mktemp(f"whole-{fmt}")
        rows = many_rows(24)
        rows[5] = "这个问题很难吗"  # a failed row, so the errors file is resumed too
        source = write_input(folder, fmt, rows)
        summary = translate(ja_en, source, folder / f"whole.{fmt}", chunk_rows=4)
        runs[fmt] = source, files_of(folder / f"whole.{fmt}"), summary.counts()
    return runs


@pytest.mark.parametrize("fmt", ["txt", "csv"])
@pytest.mark.parametrize("point,occurrence", CRASHES)
def test_resume_after_crash_gives_output_identical_to_an_uninterrupted_run(ja_en, tmp_path, fmt,
                                                                           point, occurrence, uninterrupted):
    source, expected_files, expected_counts = uninterrupted[fmt]
    resumed = tmp_path / f"resumed.{fmt}"
    with pytest.raises(Crash):
        translate(ja_en, source, resumed, chunk_rows=4, checkpoint=crash_at(point, occurrence))
    summary = translate(ja_en, source, resumed, chunk_rows=4)
    assert files_of(resumed) == expected_files
    assert summary.counts() == expected_counts and expected_counts["failed"] == 1


def test_resume_cuts_off_bytes_written_after_the_last_committed_chunk(ja_en, tmp_path):
    source = write_input(tmp_path, "jsonl", many_rows(14))
    translate(ja_en, source, tmp_path / "whole.jsonl", chunk_rows=4)
    with pytest.raises(Crash):
        translate(ja_en, source, tmp_path / "out.jsonl", chunk_rows=4, checkpoint=crash_at("before_progress", 3))
    with open(tmp_path / "out.jsonl", "ab") as f:  # a torn write: half a line of garbage
        f.write(b'{"id": 999, "te')
    translate(ja_en, source, tmp_path / "out.jsonl", chunk_rows=4)
    assert files_of(tmp_path / "out.jsonl") == files_of(tmp_path / "whole.jsonl")


def test_a_job_where_no_row_failed_leaves_no_errors_file_even_after_a_crash_and_resume(ja_en, tmp_path):
    source = write_input(tmp_path, "txt", many_rows(14))
    errors = tmp_path / "out.txt.errors.jsonl"
    with pytest.raises(Crash):
        translate(ja_en, source, tmp_path / "out.txt", chunk_rows=4, checkpoint=crash_at("before_progress", 3))
    assert errors.exists() and errors.stat().st_size == 0  # open while the job runs: a resume cuts it to 0
    summary = translate(ja_en, source, tmp_path / "out.txt", chunk_rows=4)
    assert summary.failed == 0 and not errors.exists()
    assert str(errors) not in summary.describe()
    again = translate(ja_en, source, tmp_path / "out.txt", chunk_rows=4)
    assert again.already_complete and not errors.exists()  # opening it to lock it does not leave it behind
    whole = translate(ja_en, source, tmp_path / "whole.txt", chunk_rows=4)
    assert whole.failed == 0 and files_of(tmp_path / "out.txt") == files_of(tmp_path / "whole.txt")


def test_crash_in_the_model_mid_chunk_resumes_without_losing_a_row(tiny_ja_en_dir, tmp_path):
    class FailingOnce(Translator):
        calls, fail_at = 0, None

        def translate(self, texts):
            FailingOnce.calls += 1
            if FailingOnce.calls == FailingOnce.fail_at:
                raise RuntimeError("CUDA error: an illegal memory access")  # not a user error: the job stops
            return super().translate(texts)

    flaky = FailingOnce.from_pretrained(str(tiny_ja_en_dir), device="cpu", backend="transformers", num_beams=1)
    source = write_input(tmp_path, "txt", many_rows(16))
    translate(flaky, source, tmp_path / "whole.txt", chunk_rows=5)
    FailingOnce.calls, FailingOnce.fail_at = 0, 3
    with pytest.raises(RuntimeError):
        translate(flaky, source, tmp_path / "out.txt", chunk_rows=5)
    translate(flaky, source, tmp_path / "out.txt", chunk_rows=5)
    assert files_of(tmp_path / "out.txt") == files_of(tmp_path / "whole.txt")


def test_changed_input_under_an_unfinished_output_is_refused(ja_en, tmp_path):
    source = write_input(tmp_path, "txt", many_rows(20))
    with pytest.raises(Crash):
        translate(ja_en, source, tmp_path / "out.txt", chunk_rows=4, checkpoint=crash_at("after_progress", 2))
    with open(source, "a", encoding="utf-8") as f:
        f.write("円安\n")
    with pytest.raises(JobError, match=r"unfinished job of an input that has changed since; pass --restart"):
        translate(ja_en, source, tmp_path / "out.txt", chunk_rows=4)
    summary = translate(ja_en, source, tmp_path / "out.txt", chunk_rows=4, restart=True)
    assert summary.rows == 21
    assert (tmp_path / "out.txt").read_text(encoding="utf-8").count("\n") == 21


def test_changed_options_under_an_unfinished_output_are_refused(ja_en, tmp_path):
    source = write_input(tmp_path, "txt", many_rows(20))
    with pytest.raises(Crash):
        translate(ja_en, source, tmp_path / "out.txt", chunk_rows=4, checkpoint=crash_at("mid_chunk", 2))
    with pytest.raises(JobError, match=r"other options \(from\)"):
        translate(ja_en, source, tmp_path / "out.txt", chunk_rows=4, source_lang="ja")


def test_existing_output_without_a_progress_record_is_never_overwritten(ja_en, tmp_path):
    source = write_input(tmp_path, "txt", JAPANESE)
    (tmp_path / "out.txt").write_text("precious\n")
    with pytest.raises(JobError, match="already exists"):
        translate(ja_en, source, tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_text() == "precious\n"
    translate(ja_en, source, tmp_path / "out.txt", restart=True)
    assert (tmp_path / "out.txt").read_text(encoding="utf-8").count("\n") == len(JAPANESE)


def test_finished_job_run_again_does_nothing_and_loads_no_model(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text(ENGLISH[0] + "\n", encoding="utf-8")

    def load():
        raise AssertionError("no model should load")

    kwargs = dict(to="en", load_translator=load, options={}, quiet=True)
    first = jobs.translate_file(source, tmp_path / "out.txt", **kwargs)  # English rows: copied, no model
    assert first.copied == 1 and not first.already_complete
    again = jobs.translate_file(source, tmp_path / "out.txt", **kwargs)
    assert again.already_complete and again.copied == 1 and "already complete" in again.describe()
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == ENGLISH[0] + "\n"


def test_a_second_job_on_the_same_output_is_refused_while_the_first_runs(ja_en, tmp_path):
    source = write_input(tmp_path, "txt", many_rows(12))

    def second_job(point):
        if point == "after_progress":
            with pytest.raises(JobError, match="another job is writing"):
                translate(ja_en, source, tmp_path / "out.txt", chunk_rows=4)

    summary = translate(ja_en, source, tmp_path / "out.txt", chunk_rows=4, checkpoint=second_job)
    assert summary.rows == 12


@pytest.mark.parametrize("input_name,output_name,message", [
    ("in.txt", "in.txt", "four different files"),
    ("in.xml", "out.xml", "unknown input type"),
    ("in.txt", "out.jsonl", "must be a .txt file"),
    ("missing.txt", "out.txt", "no such file"),
])
def test_unusable_paths_are_refused_before_any_model_loads(tmp_path, input_name, output_name, message):
    if input_name != "missing.txt":
        (tmp_path / input_name).write_text("円安\n", encoding="utf-8")
    with pytest.raises(JobError, match=message):
        jobs.translate_file(tmp_path / input_name, tmp_path / output_name, to="en", options={},
                            load_translator=lambda: pytest.fail("loaded a model"))


def test_csv_without_the_column_is_refused_before_any_model_loads(tmp_path):
    (tmp_path / "in.csv").write_text("id,body\n1,円安\n", encoding="utf-8")
    with pytest.raises(JobError, match="no column 'text' \\(columns: id, body\\)"):
        jobs.translate_file(tmp_path / "in.csv", tmp_path / "out.csv", to="en", options={},
                            load_translator=lambda: pytest.fail("loaded a model"))


@pytest.fixture(scope="module")
def short_answers():
    return GenerationSettings(max_new_tokens=6)


def test_ask_file_writes_the_json_fields_after_the_input_fields(qa, tmp_path, short_answers):
    source = tmp_path / "q.jsonl"
    source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"id": "a", "text": "What is inflation?"}, {"id": "b", "text": "金利が上がるとどうなりますか？"},
        {"id": "c", "text": ""}]) + "\n", encoding="utf-8")
    summary = qa.ask_file(source, tmp_path / "a.jsonl", settings=short_answers, quiet=True)
    out = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    single = qa.ask("What is inflation?", settings=short_answers).to_dict()
    single.pop("timings")
    assert out[0] == {"id": "a", "text": "What is inflation?", **single}
    assert [o["id"] for o in out] == ["a", "b"] and out[1]["source_lang"] == "ja"
    assert summary.failed == 1 and read_errors(tmp_path / "a.jsonl")[0]["line"] == 3


def test_ask_file_from_txt_keeps_each_line_as_question_and_resumes_identically(qa, tmp_path,
                                                                               short_answers):
    source = tmp_path / "q.txt"
    source.write_text("\n".join(["What is inflation?", "", "円安とは何ですか？", "这个问题很难吗",
                                 "Why do rates rise?", "株式とは何ですか？", "What is a bond?"]) + "\n", encoding="utf-8")
    qa.ask_file(source, tmp_path / "whole.jsonl", settings=short_answers, quiet=True, chunk_rows=2)
    with pytest.raises(Crash):
        jobs.ask_file(source, tmp_path / "out.jsonl", load_qa=lambda: qa, options=qa.job_options(),
                      settings=short_answers, quiet=True, chunk_rows=2, checkpoint=crash_at("before_progress", 3))
    summary = qa.ask_file(source, tmp_path / "out.jsonl", settings=short_answers, quiet=True, chunk_rows=2)
    assert files_of(tmp_path / "out.jsonl") == files_of(tmp_path / "whole.jsonl")
    questions = [json.loads(line)["question"] for line in (tmp_path / "out.jsonl").read_text("utf-8").splitlines()]
    assert questions == ["What is inflation?", "円安とは何ですか？", "Why do rates rise?", "株式とは何ですか？", "What is a bond?"]
    assert (summary.done, summary.failed, summary.blank) == (5, 1, 1)


def test_a_job_that_failed_before_its_first_row_can_be_rerun_with_other_options(ja_en, tmp_path):
    source = write_input(tmp_path, "txt", JAPANESE[:2])

    def broken_model():
        raise JobError("model not found")  # stands for a wrong --ja-en path

    with pytest.raises(JobError, match="model not found"):
        jobs.translate_file(source, tmp_path / "out.txt", to="en", options={"model": "wrong"},
                            load_translator=broken_model, source_lang="ja", quiet=True)
    summary = jobs.translate_file(source, tmp_path / "out.txt", to="en", options={"model": "right"},
                                  load_translator=lambda: ja_en, source_lang="ja", quiet=True)
    assert summary.done == 2
