"""`bilingual-qa finetune` in real subprocesses: the adapter it makes answers what it was taught
through `ask`, `compare` and `serve`; bad rows go to the errors file; reruns, refusals."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from cli_run import assert_one_line_error, run_cli
from train_support import LEARN, PAIRS, write_jsonl

ASK = ["--beams", "1", "--engine", "transformers", "--mt-backend", "transformers", "--format", "json"]


@pytest.fixture(scope="module")
def translators(tiny_ja_en_dir, tiny_en_ja_dir) -> list[str]:
    return ["--ja-en", str(tiny_ja_en_dir), "--en-ja", str(tiny_en_ja_dir)]


def ask(question: str, llm, translators) -> dict:
    proc = run_cli("ask", question, "--llm", str(llm), *translators, *ASK, "--max-new-tokens", "40")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return json.loads(proc.stdout)


def test_the_adapter_answers_each_trained_question_with_its_answer_and_stops(trained, sharp_phi2_dir, translators):
    for question, answer in PAIRS:
        result = ask(question, trained["output"], translators)
        assert result["answer_en"] == answer
        assert result["finish_reason"] == "eos"  # it learned where its answer ends
        assert result["models"]["llm_base"] == str(sharp_phi2_dir)
        assert ask(question, sharp_phi2_dir, translators)["answer_en"] != answer  # the base does not know it


def test_the_adapter_names_its_base_and_carries_a_card(trained, sharp_phi2_dir):
    output = trained["output"]
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(sharp_phi2_dir.resolve())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    with safe_open(str(output / "adapter_model.safetensors"), "pt") as f:
        assert all(".lora_" in key for key in f.keys())  # factors only: no copy of the base
    card = json.loads((output / "finetune.json").read_text())
    assert card["data"]["sha256"] == __import__("hashlib").sha256(trained["data"].read_bytes()).hexdigest()
    assert card["data"]["rows"] == 9 and card["data"]["failed"] == 6 and card["data"]["train_pairs"] == 3
    assert card["options"]["epochs"] == 40 and card["options"]["learning_rate"] == 0.01
    assert card["losses"]["train"] < 0.1 and card["losses"]["eval"] is None  # 3 pairs: none held out
    assert "final train loss" in (output / "README.md").read_text().lower()
    for leftover in (".partial", ".checkpoint.pt", ".lock", ".progress.json"):  # the run's own, gone
        assert not (output.parent / f"adapter{leftover}").exists()


def test_every_bad_row_is_in_the_errors_file_with_its_line_and_reason(trained):
    errors = [json.loads(line) for line in (trained["output"].parent / "adapter.errors.jsonl").read_text().splitlines()]
    reasons = {e["line"]: e["reason"] for e in errors}
    assert sorted(reasons) == [3, 4, 6, 7, 8, 9]
    assert reasons[3] == "no field 'answer'" and "invalid JSON" in reasons[4] and "is empty" in reasons[6]
    assert "invalid UTF-8" in reasons[7] and "'ko'" in reasons[8] and "--max-length is 128" in reasons[9]
    pairs = [json.loads(line) for line in (trained["output"].parent / "adapter.pairs.jsonl").read_text().splitlines()]
    assert [(p["line"], p["question"], p["answer"]) for p in pairs] == [(1, *PAIRS[0]), (2, *PAIRS[1]), (5, *PAIRS[2])]
    assert "3 pairs trained on" in trained["proc"].stderr.decode()


def test_the_same_command_again_is_already_complete_and_loads_nothing(trained, sharp_phi2_dir, tiny_ja_en_dir):
    before = (trained["output"] / "adapter_model.safetensors").read_bytes()
    proc = run_cli("finetune", str(trained["data"]), "--output", str(trained["output"]), "--llm", str(sharp_phi2_dir),
                   "--ja-en", str(tiny_ja_en_dir), *LEARN)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "already complete" in proc.stderr.decode() and "loading" not in proc.stderr.decode()
    changed = run_cli("finetune", str(trained["data"]), "--output", str(trained["output"]), "--llm",
                      str(sharp_phi2_dir), "--ja-en", str(tiny_ja_en_dir), *LEARN, "--seed", "7")
    assert_one_line_error(changed, "holds an adapter trained with other options (seed)", "--restart")
    assert (trained["output"] / "adapter_model.safetensors").read_bytes() == before


def test_compare_loads_the_base_once_beside_its_new_adapter(trained, sharp_phi2_dir, translators):
    proc = run_cli("compare", PAIRS[1][0], "--llm", str(sharp_phi2_dir), "--llm", str(trained["output"]), *translators,
                   *ASK, "--max-new-tokens", "40")
    assert proc.returncode == 0, proc.stderr.decode()
    base, adapter = json.loads(proc.stdout)
    assert adapter["answer_en"] == PAIRS[1][1] and base["answer_en"] != PAIRS[1][1]
    assert proc.stderr.decode().count(f"loading {sharp_phi2_dir} ") == 1


def test_serve_holds_one_base_for_it_and_its_adapter(trained, sharp_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir):
    pytest.importorskip("starlette", reason="the serve extra is not installed")
    import asyncio

    from pipeline import GenerationSettings
    from pipeline.serve.models import LoadOptions, ModelRegistry
    from pipeline.serve.service import AskRequest, Service

    registry = ModelRegistry.load(LoadOptions(llms=[str(sharp_phi2_dir), str(trained["output"])],
                                              ja_en=str(tiny_ja_en_dir), en_ja=str(tiny_en_ja_dir), device="cpu",
                                              engine="transformers", beams=1, max_rows=8))
    try:
        assert len({id(qa.answerer.model) for qa in registry.qas.values()}) == 1  # one copy of the base
        assert len({id(s) for s in registry.schedulers.values()}) == 1  # and one batch for both
        settings = GenerationSettings(max_new_tokens=40)
        for question, answer in PAIRS:
            result = asyncio.run(Service(registry).ask(AskRequest(question, model="adapter", settings=settings)))
            assert result["answer_en"] == answer and result["finish_reason"] == "eos"
    finally:
        registry.close()


def test_a_file_without_a_usable_pair_stops_before_phi2_loads(tmp_path, sharp_phi2_dir):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"question": "only a question"}, b"[1, 2]\n"])
    proc = run_cli("finetune", str(data), "-o", str(tmp_path / "out"), "--llm", str(sharp_phi2_dir), *LEARN)
    assert_one_line_error(proc, "has no usable question/answer pair", "2 rows, 2 refused")
    assert f"loading {sharp_phi2_dir}" not in proc.stderr.decode()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["marian as --llm", "adapter as --llm", "output not ours", "csv without column",
                                  "txt data", "batch under length", "unknown target"])
def test_refusals_are_one_line_before_any_weight_loads(case, tmp_path, tiny_ja_en_dir, tiny_lora_dir, sharp_phi2_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"question": q, "answer": a} for q, a in PAIRS])
    args, expected = ["--llm", str(sharp_phi2_dir), *LEARN], []
    if case == "marian as --llm":
        args, expected = ["--llm", str(tiny_ja_en_dir), *LEARN], ["--llm needs a phi-2-family causal LM"]
    elif case == "adapter as --llm":
        args, expected = ["--llm", str(tiny_lora_dir), *LEARN], ["is a LoRA adapter", "pass its base"]
    elif case == "output not ours":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "notes.txt").write_text("mine")
        args, expected = [*args, "--restart"], ["is not an adapter made by bilingual-qa finetune"]
    elif case == "csv without column":
        data = tmp_path / "pairs.csv"
        data.write_text("prompt,response\nWhat is a bond?,A bond.\n")
        expected = ["has no column 'question'", "--question-field"]
    elif case == "txt data":
        data = tmp_path / "pairs.txt"
        data.write_text("What is a bond?\n")
        expected = ["a .txt file holds no pairs"]
    elif case == "batch under length":
        args, expected = [*args, "--batch-tokens", "64"], ["--batch-tokens 64 is below --max-length 128"]
    else:
        args, expected = [*args, "--target-modules", "q_proj,attention"], ["phi-2 has no linear layer 'attention'"]
    proc = run_cli("finetune", str(data), "--output", str(tmp_path / "out"), *args)
    assert_one_line_error(proc, *expected)
    assert "loading" not in proc.stderr.decode()
    if case == "output not ours":
        assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
