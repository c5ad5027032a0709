"""Translation backends give generate's tokens: the fast torch path, CTranslate2, and the choice."""

from __future__ import annotations

import filecmp
import importlib.util
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.errors import BilingualQAError, ModelLoadError
from pipeline.mt.fast_marian import KERNEL_PARTS, FastMarianBackend
from pipeline.mt.backends import TransformersMTBackend, select_mt_backend

needs_ct2 = pytest.mark.skipif(
    __import__("importlib").util.find_spec("ctranslate2") is None, reason="ctranslate2 not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# The Triton kernels run on CUDA, or on the CPU in Triton's interpreter (TRITON_INTERPRET=1).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None
    or (KERNEL_DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs Triton, on CUDA or in its interpreter (TRITON_INTERPRET=1)")

def _sources(vocab: int) -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(2, vocab - 1) for _ in range(rng.randrange(1, 30))] + [0] for _ in range(16)]


def _eos_bias(model) -> float:
    """An end-of-sentence bias under which rows end at many different steps, some at once and
    some never, so masking and early stop are exercised (the tiny weights differ between library
    versions, so it is chosen, not fixed)."""
    rows, spread = _sources(model.config.vocab_size), {}
    for bias in (2.0, 3.0, 4.0, 5.0, 6.0):
        with torch.no_grad():
            model.final_logits_bias[0, model.config.eos_token_id] = bias
        lengths = [len(r) for r in TransformersMTBackend(model).generate(rows, 20, 1)]
        spread[bias] = len(set(lengths)) + (0 in lengths) + (20 in lengths)
    return max(spread, key=spread.get)


@pytest.fixture(scope="session")
def published(tiny_ja_en_dir, tmp_path_factory) -> tuple[Path, float]:
    """A tiny ja->en checkpoint as published (zero <pad> embedding row), with an end-of-sentence
    bias that makes rows finish at different steps; and that bias."""
    from transformers import MarianMTModel

    model = MarianMTModel.from_pretrained(tiny_ja_en_dir).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[model.config.pad_token_id].zero_()
    bias = _eos_bias(model)
    with torch.no_grad():
        model.final_logits_bias[0, model.config.eos_token_id] = bias
    path = tmp_path_factory.mktemp("published") / "tiny-ja-en"
    model.save_pretrained(path)
    for name in ("vocab.json", "source.spm", "target.spm", "tokenizer_config.json"):
        shutil.copy(tiny_ja_en_dir / name, path / name)
    return path, bias


@pytest.fixture(scope="session")
def marian_dir(published) -> Path:
    return published[0]


def load(published: tuple[Path, float], device: str = "cpu"):
    """The checkpoint, with its bias set again: transformers 5.17 may not reload it."""
    from transformers import MarianMTModel

    model = MarianMTModel.from_pretrained(published[0]).eval()
    with torch.no_grad():
        model.final_logits_bias[0, model.config.eos_token_id] = published[1]
    return model.to(device)


@pytest.fixture(scope="session")
def model(published):
    return load(published)


@pytest.fixture(scope="session")
def sources(model) -> list[list[int]]:
    return _sources(model.config.vocab_size)


def test_fast_greedy_is_token_identical_to_generate(model, sources):
    fast = FastMarianBackend(model, use_graphs=False)
    for max_new_tokens in (1, 6, 20):
        expected = TransformersMTBackend(model).generate(sources, max_new_tokens, 1)
        got = fast.generate(sources, max_new_tokens, 1)
        assert [i for i in range(len(got)) if got[i] != expected[i]] == [], (max_new_tokens, got, expected)
    lengths = {len(row) for row in expected}
    assert min(lengths) < max_new_tokens and len(lengths) > 2   # rows end at different steps


def test_fast_beam_search_is_token_identical_to_generate(model, sources):
    fast = FastMarianBackend(model, use_graphs=False)
    for beams, max_new_tokens in ((4, 16), (3, 7)):
        assert fast.generate(sources, max_new_tokens, beams) == \
            TransformersMTBackend(model).generate(sources, max_new_tokens, beams)


def test_fast_backend_keeps_order_across_many_small_launches(model, sources):
    # max_rows=5: several launches per length bucket, and batches padded with filler rows.
    fast = FastMarianBackend(model, use_graphs=False, max_rows=5)
    expected = TransformersMTBackend(model).generate(sources, 12, 1)
    assert fast.generate(sources, 12, 1) == expected
    assert fast.generate(sources[:1], 12, 1) == expected[:1]


def test_fast_backend_never_emits_pad_or_eos(model, sources):
    out = FastMarianBackend(model, use_graphs=False).generate(sources, 25, 2)
    assert all(model.config.pad_token_id not in row and 0 not in row and len(row) <= 25 for row in out)


@needs_cuda
def test_fast_backend_with_cuda_graphs_matches_generate(published, sources):
    cuda_model = load(published, "cuda")
    fast = FastMarianBackend(cuda_model)
    assert fast.use_graphs
    assert fast.kernels == (set(KERNEL_PARTS) if importlib.util.find_spec("triton") else set())
    reference = TransformersMTBackend(cuda_model)
    for beams in (1, 4):
        expected = reference.generate(sources, 24, beams)
        agree = sum(a == b for a, b in zip(fast.generate(sources, 24, beams), expected))
        # float32 on a GPU: the kernels differ from generate's, so allow a rare argmax tie flip.
        assert agree >= len(sources) - 1


@needs_triton
def test_decode_attention_kernel_matches_softmax_attention_over_parent_pointers():
    from pipeline.kernels.marian import decode_attention

    torch.manual_seed(0)
    positions, rows, heads, head_dim, span = 70, 6, 2, 16, 67   # two blocks of 64 positions
    cache = torch.randn(positions, rows, 2, heads, head_dim, device=KERNEL_DEVICE)
    q = torch.randn(rows, heads * head_dim, device=KERNEL_DEVICE)
    origin = torch.randint(0, rows, (positions, rows), dtype=torch.int32, device=KERNEL_DEVICE)
    got = decode_attention(q, cache[:, :, 0], cache[:, :, 1], span, heads, cache.stride(0), cache.stride(1),
                           origin=origin)
    picked = cache[torch.arange(span)[:, None], origin[:span].long().cpu()]   # [span, rows, 2, heads, d]
    k, v = picked[:, :, 0].permute(1, 2, 0, 3), picked[:, :, 1].permute(1, 2, 0, 3)
    expected = torch.nn.functional.scaled_dot_product_attention(q.view(rows, heads, 1, -1), k, v)
    assert torch.allclose(got, expected.reshape(rows, -1), atol=1e-5)
    # Cross-attention: two beams per sentence share its keys; lengths mask the padding.
    keys = torch.randn(3, positions, heads, head_dim, device=KERNEL_DEVICE)
    values = torch.randn_like(keys)
    lengths = torch.tensor([5, 70, 66], device=KERNEL_DEVICE)
    got = decode_attention(q, keys, values, positions, heads, keys.stride(1), keys.stride(0),
                           lengths=lengths, group=2)
    mask = (torch.arange(positions, device=KERNEL_DEVICE)[None, :] < lengths[:, None])[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.view(3, 2, heads, -1).transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask)
    assert torch.allclose(got, expected.transpose(1, 2).reshape(rows, -1), atol=1e-5)


@needs_triton
def test_chunked_top_k_and_add_layer_norm_kernels_match_torch():
    from pipeline.kernels.marian import add_layer_norm, chunk_top

    torch.manual_seed(1)
    logits = torch.randn(5, 5000, device=KERNEL_DEVICE)   # three chunks, the last partial
    pad = 4999
    logits[1, pad] = 100.0   # pad is never picked, but counts in the softmax normaliser
    logits[2, 4100] = 50.0   # the best in the last chunk
    values, index = chunk_top(logits, pad, 1)
    masked = logits.clone()
    masked[:, pad] = float("-inf")
    assert torch.equal(index[:, 0], masked.argmax(1)) and torch.equal(values[:, 0], masked.amax(1))
    values, index, chunk_max, chunk_sum = chunk_top(logits, pad, 4, stats=True)
    top = chunk_max.amax(1, keepdim=True)
    lse = top + torch.log((chunk_sum * torch.exp(chunk_max - top)).sum(1, keepdim=True))
    assert torch.allclose(lse[:, 0], torch.logsumexp(logits, 1))
    best, at = values.topk(4)
    assert torch.equal(best, masked.topk(4).values)
    assert torch.equal(torch.gather(index, 1, at), masked.topk(4).indices)
    x, y = torch.randn(2, 7, 48, device=KERNEL_DEVICE)
    weight, bias = torch.randn(2, 48, device=KERNEL_DEVICE)
    assert torch.allclose(add_layer_norm(x, y, weight, bias, 1e-5),
                          torch.nn.functional.layer_norm(x + y, (48,), weight, bias, 1e-5), atol=1e-5)


@needs_cuda
def test_a_shapes_eager_first_batch_equals_its_captured_and_replayed_batches(published, sources):
    fast = FastMarianBackend(load(published, "cuda"))
    for beams in (1, 4):
        first = fast.generate(sources, 24, beams)  # eager: a shape seen once is not captured
        session = next(reversed(fast.sessions.values()))
        assert session.graphs == [] and session.uses == 1
        assert fast.generate(sources, 24, beams) == first  # captured now, then replayed
        assert session.graphs and fast.generate(sources, 24, beams) == first


@needs_triton
def test_fast_backend_with_triton_kernels_matches_generate(published, sources):
    model = load(published, KERNEL_DEVICE)
    fast = FastMarianBackend(model, use_graphs=KERNEL_DEVICE == "cuda", kernels=KERNEL_PARTS)
    reference = TransformersMTBackend(model)
    for beams, max_new_tokens in ((1, 20), (4, 16)):
        expected = reference.generate(sources, max_new_tokens, beams)
        agree = sum(a == b for a, b in zip(fast.generate(sources, max_new_tokens, beams), expected))
        # float32, other kernels than generate's: allow a rare flip between near-equal scores.
        assert agree >= len(sources) - 1, (beams, agree)


@needs_ct2
def test_ctranslate2_float32_is_token_identical_to_generate_greedy(marian_dir, model, sources, tmp_path):
    from pipeline.mt.ctranslate2 import CTranslate2Backend

    ct2 = CTranslate2Backend(marian_dir, quantization="float32", cache_root=tmp_path)
    for max_new_tokens in (1, 8, 30):
        assert ct2.generate(sources, max_new_tokens, 1) == \
            TransformersMTBackend(model).generate(sources, max_new_tokens, 1)


@needs_ct2
def test_ctranslate2_conversion_matches_the_converter_cli_and_is_reused(marian_dir, sources, tmp_path):
    import ctranslate2

    from pipeline.mt.ctranslate2 import CTranslate2Backend

    ours = CTranslate2Backend(marian_dir, cache_root=tmp_path / "cache")   # int8, converted now
    cli = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "ctranslate2.converters.transformers", "--model", str(marian_dir),
                    "--output_dir", str(cli), "--quantization", "int8"], check=True, capture_output=True)
    assert filecmp.cmp(ours.model_path / "model.bin", cli / "model.bin", shallow=False)
    translator = ctranslate2.Translator(str(cli), device="cpu")
    tokens = [ours.tokenizer.convert_ids_to_tokens(row) for row in sources]
    expected = [ours.tokenizer.convert_tokens_to_ids(r.hypotheses[0]) for r in translator.translate_batch(
        tokens, beam_size=1, max_decoding_length=20, min_decoding_length=0)]
    assert ours.generate(sources, 20, 1) == expected

    stamp = (ours.model_path / "model.bin").stat().st_mtime_ns
    again = CTranslate2Backend(marian_dir, cache_root=tmp_path / "cache")
    assert again.model_path == ours.model_path
    assert (again.model_path / "model.bin").stat().st_mtime_ns == stamp   # not converted twice


def test_explicit_fast_backend_on_cpu_is_a_user_error(model, marian_dir):
    with pytest.raises(ModelLoadError):
        select_mt_backend("fast", model, str(marian_dir), torch.device("cpu"))
    with pytest.raises(BilingualQAError):
        select_mt_backend("nonsense", model, str(marian_dir), torch.device("cpu"))


def test_auto_on_cpu_without_ctranslate2_falls_back_with_one_notice(model, marian_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)   # as if the extra were not installed
    backend = select_mt_backend("auto", model, str(marian_dir), torch.device("cpu"))
    assert backend.name == "transformers"
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(ModelLoadError):
        select_mt_backend("ctranslate2", model, str(marian_dir), torch.device("cpu"))


@needs_ct2
def test_auto_on_cpu_uses_ctranslate2_when_installed(model, marian_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    backend = select_mt_backend("auto", model, str(marian_dir), torch.device("cpu"))
    assert backend.name == "ctranslate2"
    assert backend.model_path.is_relative_to(tmp_path)


def test_auto_keeps_transformers_for_a_checkpoint_ctranslate2_cannot_reproduce(published, marian_dir, capsys):
    odd = load(published)
    with torch.no_grad():
        odd.get_input_embeddings().weight[odd.config.pad_token_id] = 1.0
    capsys.readouterr()
    assert select_mt_backend("auto", odd, str(marian_dir), torch.device("cpu")).name == "transformers"
    assert capsys.readouterr().err.count("\n") == 1
