"""The `bilingual-qa` command in real subprocesses, as a user runs it."""

from __future__ import annotations

import json

import pytest

from cli_run import assert_one_line_error, run_cli  # tests/cli_run.py

JA_QUESTION = "金利が上昇すると、どのように個人や企業の経済活動に影響を与えるのでしょうか？"


def test_ask_japanese_prints_english_then_divider_then_japanese(model_args):
    proc = run_cli("ask", JA_QUESTION, *model_args, "--max-new-tokens", "12", "--beams", "1")
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    english, japanese = out.split("\n### ---\n")
    assert JA_QUESTION in japanese and JA_QUESTION not in english
    assert "loading" in proc.stderr.decode()  # the status line while models load


def test_ask_json_reads_stdin_and_has_the_contract_fields(model_args):
    proc = run_cli("ask", *model_args, "--format", "json", "--max-new-tokens", "8", "--beams", "1",
                   stdin="What is a bond?\n".encode())
    assert proc.returncode == 0, proc.stderr.decode()
    data = json.loads(proc.stdout)
    assert data["source_lang"] == "en" and data["question_en"] == "What is a bond?"
    assert {"question_ja", "answer_en", "answer_ja", "finish_reason", "models", "timings"} <= set(data)


def test_model_defaults_come_from_environment_variables(tiny_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir):
    env = {"BILINGUAL_QA_LLM": str(tiny_phi2_dir), "BILINGUAL_QA_JA_EN": str(tiny_ja_en_dir),
           "BILINGUAL_QA_EN_JA": str(tiny_en_ja_dir)}
    proc = run_cli("ask", "What is a bond?", "--format", "json", "--max-new-tokens", "4", "--beams", "1", env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["models"]["llm"] == str(tiny_phi2_dir)


def test_compare_answers_with_each_model(model_args, tiny_phi2_dir):
    args = [a for a in model_args]
    args[args.index("--llm"):args.index("--llm") + 2] = []
    proc = run_cli("compare", "What is a bond?", "--llm", str(tiny_phi2_dir), "--llm", str(tiny_phi2_dir),
                   *args, "--format", "json", "--max-new-tokens", "6", "--beams", "1")
    assert proc.returncode == 0, proc.stderr.decode()
    results = json.loads(proc.stdout)
    assert len(results) == 2 and results[0]["answer_en"] == results[1]["answer_en"]


@pytest.mark.parametrize("question", ["", "   \n"])
def test_empty_question_is_one_line_error(model_args, question):
    assert_one_line_error(run_cli("ask", *model_args, stdin=question.encode()), "empty")


def test_unsupported_language_is_refused_before_loading_models(model_args):
    proc = run_cli("ask", "利率上升会如何影响个人和企业的经济活动？", *model_args)
    assert_one_line_error(proc, "'zh'", "--source-lang")
    assert "loading" not in proc.stderr.decode()


def test_invalid_utf8_on_stdin_is_refused(model_args):
    assert_one_line_error(run_cli("ask", *model_args, stdin=b"caf\xe9 \xff?"), "UTF-8")


def test_over_long_question_names_the_limit(model_args):
    assert_one_line_error(run_cli("ask", *model_args, stdin=("interest " * 1000).encode()), "limit")


def test_question_too_long_for_phi2_names_its_token_limit(model_args):
    proc = run_cli("ask", *model_args, "--max-new-tokens", "2000", stdin=b"What is a bond? " * 20)
    assert_one_line_error(proc, "2048")


def test_missing_model_directory_is_named(model_args):
    args = list(model_args)
    args[args.index("--llm") + 1] = "./no/such/model"
    assert_one_line_error(run_cli("ask", "What is a bond?", *args), "./no/such/model", "--llm DIR")


def test_hub_id_not_cached_while_offline_says_how_to_pass_a_directory(model_args, tmp_path):
    args = list(model_args)
    args[args.index("--en-ja") + 1] = "someone/not-cached-model"
    proc = run_cli("ask", "What is a bond?", *args, env={"HF_HOME": str(tmp_path)})
    assert_one_line_error(proc, "someone/not-cached-model", "offline", "--en-ja DIR")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_device_without_gpu_is_refused(model_args):
    assert_one_line_error(run_cli("ask", "What is a bond?", *model_args, "--device", "cuda"), "no CUDA GPU")


def test_unknown_option_is_one_line_error():
    assert_one_line_error(run_cli("ask", "--no-such-option"), "--no-such-option")


def test_streamed_output_equals_the_plain_text_output(model_args):
    args = ["ask", "What is a bond?", *model_args, "--max-new-tokens", "10", "--beams", "1"]
    plain, streamed = run_cli(*args), run_cli(*args, "--stream")
    assert streamed.returncode == 0, streamed.stderr.decode()
    assert streamed.stdout == plain.stdout


def test_stream_with_json_is_refused(model_args):
    assert_one_line_error(run_cli("ask", "What is a bond?", *model_args, "--stream", "--format", "json"), "--stream")


# ---- --raw: phi-2's whole output, as the source article printed it ------------------------------------

def whole_generation(tiny_phi2_dir, question: str, max_new_tokens: int) -> str:
    """What phi-2 (here the tiny checkpoint) writes after the prompt, untrimmed, greedy."""
    from pipeline.llm.answerer import Answerer
    from pipeline.spec import GenerationSettings

    answerer = Answerer.from_pretrained(str(tiny_phi2_dir), device="cpu", engine="transformers")
    return answerer.answer([question], GenerationSettings(max_new_tokens=max_new_tokens, raw=True))[0].text


def test_ask_raw_json_holds_the_whole_output_and_says_raw(model_args, tiny_phi2_dir):
    args = ["ask", "What is a bond?", *model_args, "--format", "json", "--max-new-tokens", "24", "--beams", "1"]
    raw, trimmed = run_cli(*args, "--raw"), run_cli(*args)
    assert raw.returncode == 0 and trimmed.returncode == 0, raw.stderr.decode() + trimmed.stderr.decode()
    raw, trimmed = json.loads(raw.stdout), json.loads(trimmed.stdout)
    assert (raw["raw"], trimmed["raw"]) == (True, False)
    assert raw["answer_en"] == whole_generation(tiny_phi2_dir, "What is a bond?", 24)
    assert raw["finish_reason"] in ("eos", "length")  # nothing is cut in raw mode
    from pipeline import trim_answer

    assert trimmed["answer_en"] == trim_answer(raw["answer_en"], "What is a bond?")[0]
    assert raw["generated_tokens"] >= trimmed["generated_tokens"]


def test_ask_raw_text_shows_the_whole_output_and_its_translation_and_streams_the_same(model_args, tiny_phi2_dir):
    args = ["ask", "What is a bond?", *model_args, "--max-new-tokens", "16", "--beams", "1", "--raw"]
    plain, streamed = run_cli(*args), run_cli(*args, "--stream")
    assert plain.returncode == 0, plain.stderr.decode()
    english, japanese = plain.stdout.decode().split("\n### ---\n")
    assert english == f"Q: What is a bond?\n\n{whole_generation(tiny_phi2_dir, 'What is a bond?', 16)}\n"
    assert japanese.strip()  # the translation of the whole output
    assert streamed.stdout == plain.stdout


def test_compare_raw_gives_each_models_whole_output(model_args, tiny_phi2_dir):
    args = [a for a in model_args]
    args[args.index("--llm"):args.index("--llm") + 2] = []
    proc = run_cli("compare", "What is a bond?", "--llm", str(tiny_phi2_dir), "--llm", str(tiny_phi2_dir),
                   *args, "--format", "json", "--max-new-tokens", "12", "--beams", "1", "--raw")
    assert proc.returncode == 0, proc.stderr.decode()
    whole = whole_generation(tiny_phi2_dir, "What is a bond?", 12)
    assert [(r["raw"], r["answer_en"]) for r in json.loads(proc.stdout)] == [(True, whole), (True, whole)]


def test_ask_batch_raw_writes_the_whole_outputs_and_a_raw_field(model_args, tiny_phi2_dir, tmp_path):
    source = tmp_path / "q.txt"
    source.write_text("What is a bond?\nWhat is a loan?\n", encoding="utf-8")
    common = ["ask", "--batch", str(source), *model_args, "--max-new-tokens", "10", "--beams", "1", "--quiet"]
    proc = run_cli(*common, "-o", str(tmp_path / "raw.jsonl"), "--raw")
    assert proc.returncode == 0, proc.stderr.decode()
    rows = [json.loads(line) for line in (tmp_path / "raw.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["raw"], r["answer_en"]) for r in rows] == [
        (True, whole_generation(tiny_phi2_dir, q, 10)) for q in ("What is a bond?", "What is a loan?")]
    # --raw changes the answers: the same file and output without it is another job
    again = run_cli(*common, "-o", str(tmp_path / "raw.jsonl"))
    assert again.returncode == 2 and "--restart" in again.stderr.decode()
