"""What runs where: the capability plan for each row of the README's hardware table, the NaN guard,
and the memory policy (a batch that does not fit is split, nothing is lost)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from pipeline.errors import BilingualQAError, DeviceError
from pipeline.llm.engine import (AnswerOutOfMemoryError, NonFiniteLogitsError, TransformersEngine, _FiniteLogits,
                                 generate_shrinking)
from pipeline.llm.hardware import Hardware, plan
from pipeline.spec import GenerationSettings
from pipeline.llm.memory import rows_that_fit
from pipeline.loading import auto_dtype

GiB = 2**30
ROWS = {  # the README's hardware table
    "T4": Hardware("cuda", "Tesla T4", (7, 5), 15 * GiB, 14 * GiB, "3.5.0"),
    "A10": Hardware("cuda", "NVIDIA A10", (8, 6), 22 * GiB, 21 * GiB, "3.5.0"),
    "L4": Hardware("cuda", "NVIDIA L4", (8, 9), 22 * GiB, 21 * GiB, "3.5.0"),
    "A100": Hardware("cuda", "NVIDIA A100-SXM4-80GB", (8, 0), 79 * GiB, 78 * GiB, "3.5.0"),
    "H100": Hardware("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 79 * GiB, 78 * GiB, "3.5.0"),
    "H200": Hardware("cuda", "NVIDIA H200", (9, 0), 140 * GiB, 139 * GiB, "3.5.0"),
    "CPU": Hardware("cpu"),
}
# (dtype, engine, Triton kernels, CUDA graphs, PDL, fp32 attention scores) for each row under auto
EXPECTED = {
    "T4": ("float16", "fast", False, True, False, True),
    "A10": ("bfloat16", "fast", True, True, False, False),
    "L4": ("bfloat16", "fast", True, True, False, False),
    "A100": ("bfloat16", "fast", True, True, False, False),
    "H100": ("bfloat16", "fast", True, True, True, False),
    "H200": ("bfloat16", "fast", True, True, True, False),
    "CPU": ("float32", "transformers", False, False, False, False),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_auto_plan_for_each_row_of_the_hardware_table(row):
    chosen = plan(ROWS[row])
    got = (chosen.dtype, chosen.engine, chosen.triton_kernels, chosen.cuda_graphs, chosen.pdl,
           chosen.fp32_attention_scores)
    assert got == EXPECTED[row]
    assert len(chosen.reasons) == 6 and all(why for _, why in chosen.reasons)
    config = chosen.decode_config()
    assert (config.pdl, config.fp32_attention_scores) == (chosen.pdl, chosen.fp32_attention_scores)


def test_auto_names_what_it_fell_back_from_and_why():
    t4 = plan(ROWS["T4"]).summary()
    assert "bfloat16" in t4 and "Triton kernels" in t4 and "7.5 < 8.0" in t4 and "SDPA attention" in t4
    assert "programmatic dependent launch" in plan(ROWS["A100"]).summary()
    assert plan(ROWS["H100"]).fallbacks == ()
    assert plan(ROWS["CPU"]).fallbacks == ()


def test_triton_missing_or_old_falls_back_to_sdpa_with_graphs_kept_and_no_pdl():
    from dataclasses import replace

    missing = plan(replace(ROWS["H100"], triton=None))
    assert (missing.engine, missing.triton_kernels, missing.cuda_graphs, missing.pdl) == ("fast", False, True, False)
    assert "Triton is not installed" in missing.summary()
    old = plan(replace(ROWS["H100"], triton="3.2.0"))
    assert old.triton_kernels and not old.pdl and "3.2.0 < 3.4" in old.summary()


def test_explicit_dtype_and_engine_are_kept():
    fp16 = plan(ROWS["H100"], dtype="float16")
    assert fp16.dtype == "float16" and fp16.fp32_attention_scores and fp16.fallbacks == ()
    assert plan(ROWS["T4"], dtype="float32").dtype == "float32"
    assert "emulated" in dict(plan(ROWS["T4"], dtype="bfloat16").reasons)["dtype bfloat16"]
    assert plan(ROWS["A100"], engine="transformers").engine == "transformers"
    with pytest.raises(DeviceError):
        plan(ROWS["CPU"], dtype="int3")


def test_auto_dtype_follows_the_compute_capability_not_bf16_emulation():
    assert auto_dtype("cuda", (7, 5)) == torch.float16
    assert auto_dtype("cuda", (8, 0)) == torch.bfloat16
    assert auto_dtype("cuda", (9, 0)) == torch.bfloat16
    assert auto_dtype("cpu") == torch.float32


def test_rows_that_fit_takes_the_whole_batch_or_the_largest_power_of_two_that_fits():
    assert rows_that_fit(128, 100, 1e6) == 128
    assert rows_that_fit(100, 100, 6_500) == 64
    assert rows_that_fit(100, 100, 50) == 1  # never less than one row
    assert rows_that_fit(3, 100, 250) == 2


def test_out_of_memory_halves_the_group_and_loses_nothing():
    calls, released = [], []

    def run(group, first):
        assert group[0] == first  # each group knows where it starts in the call
        calls.append(list(group))
        if len(group) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (pretend)")
        return [item * 10 for item in group]

    items = list(range(11))
    assert generate_shrinking(items, run, 8, lambda: released.append(True)) == [i * 10 for i in items]
    assert [len(c) for c in calls] == [8, 4, 2, 2, 2, 2, 2, 1]  # 8 and 4 fail; 2 from then on
    assert len(released) == 2
    with pytest.raises(AnswerOutOfMemoryError):
        generate_shrinking([1], lambda group, first: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("oom")), 1)


def test_fast_engine_splits_a_batch_that_runs_out_of_memory_and_keeps_every_row(tiny_phi2_dir):
    from transformers import PhiForCausalLM

    from pipeline.llm.fast_engine import FastPhiEngine

    model = PhiForCausalLM.from_pretrained(tiny_phi2_dir, dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    prompts = [[5, 17, 99, 3], [42] * 11, list(range(100, 140)), [7], [300, 12, 450]]
    settings = GenerationSettings(max_new_tokens=12)
    want = [g.token_ids for g in FastPhiEngine(model, eos, use_graphs=False).generate(prompts, settings)]

    class Tight(FastPhiEngine):  # a card on which more than two rows do not fit
        def _prefill(self, group, width, state):
            if len(group) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (pretend)")
            return super()._prefill(group, width, state)

    assert [g.token_ids for g in Tight(model, eos, use_graphs=False).generate(prompts, settings)] == want


def test_finite_logits_check_lets_top_p_filtering_through_and_stops_nan_and_inf():
    check = _FiniteLogits(torch.float16)
    fine = torch.tensor([[1.0, float("-inf"), 3.0]])
    assert check(None, fine) is fine
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteLogitsError, match=r"float16.*--dtype float32"):
            check(None, torch.tensor([[1.0, bad, 3.0]]))
    assert issubclass(NonFiniteLogitsError, BilingualQAError)


@pytest.fixture(scope="module")
def overflow_phi2_dir(tiny_phi2_dir, tmp_path_factory):
    """The tiny phi-2 with its LM head scaled up: its logits pass float16's 65,504, not float32's range."""
    from transformers import PhiForCausalLM

    path = tmp_path_factory.mktemp("overflow_phi2")
    model = PhiForCausalLM.from_pretrained(tiny_phi2_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(5e5)
    model.save_pretrained(path, safe_serialization=True)
    for name in tiny_phi2_dir.iterdir():
        if name.suffix != ".safetensors" and name.name not in ("config.json",) and name.is_file():
            shutil.copy(name, path / name.name)
    return path


def test_both_engines_stop_on_float16_overflow_and_float32_answers(overflow_phi2_dir):
    from transformers import PhiForCausalLM

    from pipeline.llm.fast_engine import FastPhiEngine

    prompts, settings = [[5, 17, 99, 3], [42] * 6], GenerationSettings(max_new_tokens=8)
    half = PhiForCausalLM.from_pretrained(overflow_phi2_dir, dtype=torch.float16).eval()
    eos = half.config.eos_token_id
    for engine in (TransformersEngine(half, eos), FastPhiEngine(half, eos, use_graphs=False)):
        with pytest.raises(NonFiniteLogitsError, match="float16"):
            engine.generate(prompts, settings)
    with pytest.raises(NonFiniteLogitsError):
        list(TransformersEngine(half, eos).stream(prompts[0], settings))
    full = PhiForCausalLM.from_pretrained(overflow_phi2_dir, dtype=torch.float32).eval()
    assert all(len(g.token_ids) > 0 for g in TransformersEngine(full, eos).generate(prompts, settings))


def test_cli_reports_float16_overflow_in_one_line_with_exit_code_2(overflow_phi2_dir, tiny_ja_en_dir, tiny_en_ja_dir):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "ask", "What is a bond?", "--llm", str(overflow_phi2_dir),
         "--ja-en", str(tiny_ja_en_dir), "--en-ja", str(tiny_en_ja_dir), "--device", "cpu", "--dtype", "float16",
         "--mt-backend", "transformers", "--max-new-tokens", "8", "--beams", "1"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert "non-finite logits" in last and "float16" in last and "--dtype float32" in last
    assert "Traceback" not in result.stderr


def test_doctor_json_names_device_versions_and_what_runs(tmp_path):
    import json

    result = subprocess.run([sys.executable, "-m", "pipeline", "doctor", "--format", "json", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["engine"] == "transformers"
    assert info["versions"]["torch"] == torch.__version__.split("+")[0] or info["versions"]["torch"] == torch.__version__
    assert {"triton_kernels", "cuda_graphs", "pdl", "translation_backend", "reasons"} <= set(info)
    text = subprocess.run([sys.executable, "-m", "pipeline", "doctor", "--device", "cpu"], capture_output=True,
                          text=True, timeout=300)
    assert text.returncode == 0 and text.stdout.startswith("device: cpu") and "will run: float32" in text.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the feature sets run on a GPU")
@pytest.mark.parametrize("row", ["T4", "A10", "A100", "H100"])
def test_each_rows_feature_set_forced_on_this_gpu_gives_the_full_engines_tokens(row, tiny_phi2_dir):
    """The engine with a row's kernels, PDL and attention settings (in fp32, so tokens must be equal)
    against the full engine of this GPU; then the row in its own dtype stays finite and close."""
    from transformers import PhiForCausalLM

    from pipeline.llm.fast_engine import FastPhiEngine
    from pipeline.llm.hardware import probe

    prompts = [[5, 17, 99, 3], [42] * 11, list(range(100, 140)), [7], [300, 12, 12, 450, 8, 1, 77]]
    settings = GenerationSettings(max_new_tokens=24)
    here, forced = plan(probe("cuda")), plan(ROWS[row])
    tokens = {}
    for dtype in (torch.float32, getattr(torch, forced.dtype)):
        model = PhiForCausalLM.from_pretrained(tiny_phi2_dir, dtype=dtype).eval().cuda()
        eos = model.config.eos_token_id
        full = FastPhiEngine(model, eos, max_batch_size=8, use_triton=here.triton_kernels,
                             config=here.decode_config())
        engine = FastPhiEngine(model, eos, max_batch_size=8, use_triton=forced.triton_kernels,
                               use_graphs=forced.cuda_graphs, config=forced.decode_config())
        tokens[dtype] = ([g.token_ids for g in full.generate(prompts, settings)],
                         [g.token_ids for g in engine.generate(prompts, settings)])
    want, got = tokens[torch.float32]
    assert got == want
    want, got = tokens[getattr(torch, forced.dtype)]
    same = sum(a == b for x, y in zip(got, want) for a, b in zip(x, y))
    assert same >= 0.9 * sum(len(x) for x in want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_transformers_engine_in_float16_keeps_attention_scores_in_fp32(tiny_phi2_dir):
    """The T4 row on the transformers path: SDPA restricted to its fp32-summing kernels, tokens close
    to the float32 run."""
    from transformers import PhiForCausalLM

    prompts, settings = [[5, 17, 99, 3], [42] * 11], GenerationSettings(max_new_tokens=16)
    runs = {}
    for dtype in (torch.float32, torch.float16):
        model = PhiForCausalLM.from_pretrained(tiny_phi2_dir, dtype=dtype).eval().cuda()
        engine = TransformersEngine(model, model.config.eos_token_id)
        assert engine.fp32_scores == (dtype == torch.float16)
        runs[dtype] = [g.token_ids for g in engine.generate(prompts, settings)]
    same = sum(a == b for x, y in zip(runs[torch.float16], runs[torch.float32]) for a, b in zip(x, y))
    assert same >= 0.9 * sum(len(x) for x in runs[torch.float32])


def test_gpu_memory_cap_of_a_server_on_the_unnumbered_cuda_device(monkeypatch):
    """`serve --device auto` resolves to torch.device("cuda") (no number); torch's per-process cap
    raises ValueError for such a device, which stopped every GPU server at start. torch's own check
    stands in for the cap here, so a CPU machine shows what a GPU one would raise."""
    from types import SimpleNamespace

    from torch.cuda._utils import _get_device_index

    from pipeline.llm.memory import limit_process

    caps = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * GiB))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device: caps.append((fraction, _get_device_index(device))))
    assert limit_process(0.5, torch.device("cuda")) == 40 * GiB
    assert limit_process(16 * GiB, torch.device("cuda:0")) == 16 * GiB
    assert caps == [(0.5, 0), (0.2, 0)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_cap_and_free_memory_on_a_real_card():
    from pipeline.llm.memory import limit_process, usable_memory

    total = torch.cuda.get_device_properties(0).total_memory
    assert limit_process(1.0, torch.device("cuda")) == total  # the whole card: caps nothing
    assert 0 < usable_memory(torch.device("cuda")) <= total
