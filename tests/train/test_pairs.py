"""The data file -> pairs: layouts, each bad row with its reason, the worker's languages and lengths;
the GPU fit estimate; a damaged checkpoint. No training here."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import BilingualQAError, DeviceError, JobError
from pipeline.train.pairs import Layout, PairReader, PairWorker, find_layout, known_translations


def rows_of(path, layout):
    reader = PairReader(path, layout)
    with open(path, "rb") as f:
        f.seek(reader.header_end)
        return list(reader.rows(f, reader.header_end, reader.first_line))


def test_the_instruction_input_output_layout_is_found_and_its_input_joins_the_question(tmp_path):
    data = tmp_path / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Explain the term.", "input": "bond", "output": "A loan to an issuer."},
        {"instruction": "What is a stock?", "input": "", "output": "A share of a company."}]) + "\n")
    layout = find_layout(data, None, None)
    assert layout == Layout("instruction", "output", "input")
    assert [json.loads(r.text) for r in rows_of(data, layout)] == [
        ["Explain the term.\n\nbond", "A loan to an issuer."], ["What is a stock?", "A share of a company."]]


def test_csv_and_tsv_columns_are_named_by_the_field_options(tmp_path):
    data = tmp_path / "pairs.tsv"
    data.write_text("prompt\tresponse\nWhat is a bond?\tA loan.\n\tempty\n")
    layout = find_layout(data, "prompt", "response")
    rows = rows_of(data, layout)
    assert json.loads(rows[0].text) == ["What is a bond?", "A loan."]
    assert rows[1].error == "column 'prompt' is empty" and rows[1].line == 3
    with pytest.raises(JobError, match="has no column 'answer'.*--answer-field"):
        find_layout(data, "prompt", None)


def test_each_bad_row_is_refused_with_its_reason_and_the_rest_read(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(b'{"question": "Q1", "answer": "A1"}\n{"question": "Q2"}\n{"question": "Q3", "answer": 3}\n'
                     b'\xff\xfe\n[1]\n\n{"question": "Q7", "answer": "A7"}\n')
    rows = rows_of(data, find_layout(data, None, None))
    assert [(r.line, r.error) for r in rows if r.error] == [
        (2, "no field 'answer'"), (3, "field 'answer' is not a string"), (4, "invalid UTF-8 at byte 0 of the row"),
        (5, "not a JSON object but array")]
    assert [json.loads(r.text) for r in rows if r.text] == [["Q1", "A1"], ["Q7", "A7"]]


def test_the_worker_translates_japanese_sides_once_and_refuses_other_languages_and_long_pairs(
        tiny_phi2_dir, tiny_ja_en_dir):
    from pipeline.loading import load_tokenizer
    from pipeline.mt.translator import Translator

    loads = []

    def load():
        loads.append(1)
        return Translator.from_pretrained(str(tiny_ja_en_dir), device="cpu", backend="transformers",
                                          target_lang="en", num_beams=1)

    worker = PairWorker(load, load_tokenizer(str(tiny_phi2_dir), "phi-2"), 1024, "mt-key")
    ja = "円安とは何ですか？"
    texts = [json.dumps(pair, ensure_ascii=False) for pair in
             [[ja, "A weaker yen."], ["What is it?", "42"], ["이것은 무엇입니까?", "A thing."],
              ["What is the interest rate on a loan? " * 150, "A loan."]]]
    outcomes = worker(texts)
    assert outcomes[0].added["languages"] == ["ja", "en"] and outcomes[0].added["original"] == {"question": ja}
    assert outcomes[0].added["question"] == worker.known[ja] and outcomes[0].added["mt"] == "mt-key"
    assert outcomes[1].added["languages"] == ["en", "en"]  # a number is kept as it is
    assert "looks like 'ko'" in outcomes[2].error
    assert "--max-length is 1024" in outcomes[3].error
    worker(texts[:1])
    assert loads == [1]  # loaded at the first Japanese side; the same text is never translated again


def test_a_restart_takes_the_translations_the_last_pairs_file_holds(tmp_path):
    pairs = tmp_path / "out.pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"line": 1, "question": "What is a weak yen?", "answer": "A", "original": {"question": "円安とは？"}, "mt": "k"},
        {"line": 2, "question": "Other model", "answer": "B", "original": {"question": "別"}, "mt": "other"}])
        + '\n{"line": 3, "quest')  # a line a crash cut short
    assert known_translations(pairs, "k") == {"円安とは？": "What is a weak yen?"}


def test_phi2_at_sequence_512_fits_a_16_gb_gpu_only_with_gradient_checkpointing(tmp_path):
    from pipeline.checkpoints import PUBLISHED
    from pipeline.train.fit import GIB, Shape, choose_checkpointing, training_bytes
    from pipeline.train.options import FineTune

    shape = Shape.of(PUBLISHED / "microsoft--phi-2" / "config.json")
    options = FineTune("", "", max_length=512, batch_tokens=4096)
    assert training_bytes(shape, options, 2, True) < 14 * GIB < training_bytes(shape, options, 2, False)
    assert choose_checkpointing(shape, options, 2, 15 * GIB, "cuda:0", "phi-2") is True
    assert choose_checkpointing(shape, options, 2, 70 * GIB, "cuda:0", "phi-2") is False
    with pytest.raises(DeviceError, match="needs about .* GiB on cuda:0 .* has 6.0 GiB free: lower --batch-tokens"):
        choose_checkpointing(shape, options, 2, 6 * GIB, "cuda:0", "phi-2")
    off = FineTune("", "", max_length=512, batch_tokens=4096, gradient_checkpointing="off")
    with pytest.raises(DeviceError, match="pass --gradient-checkpointing on"):
        choose_checkpointing(shape, off, 2, 15 * GIB, "cuda:0", "phi-2")


def test_a_damaged_checkpoint_is_one_line_that_says_restart(tmp_path):
    from pipeline.train.state import TrainState, load_state, save_state

    path = tmp_path / "out.checkpoint.pt"
    save_state(path, TrainState(step=3, history=[{"epoch": 1}]), "run-a")
    assert load_state(path, "run-a").step == 3
    with pytest.raises(JobError, match="belongs to another run"):
        load_state(path, "run-b")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(JobError, match="cannot be read .*--restart"):
        load_state(path, "run-a")


def test_options_that_cannot_train_are_refused_before_anything_is_read():
    from pipeline.train.options import FineTune

    for options, message in [({"lora_dropout": 1.0}, "lora_dropout"), ({"max_length": 4096}, "at most 2048"),
                             ({"epochs": 0}, "epochs"), ({"learning_rate": float("nan")}, "learning_rate"),
                             ({"dtype": "int8"}, "unknown dtype 'int8'")]:
        with pytest.raises(BilingualQAError, match=message):
            FineTune("d.jsonl", "out", **options).check()
