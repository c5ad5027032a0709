"""FastPhiEngine against transformers on the same tiny phi-2 checkpoint (CPU, fp32, no graphs).

The decode path checked here is the one the GPU captures in graphs, op for op; only the attention over
the cache differs there (a Triton kernel), and benchmarks/llm_decode.py checks that path on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from dataclasses import replace

from pipeline.errors import InputTooLongError, ModelLoadError
from pipeline.llm.decode_config import DEFAULT_DECODE
from pipeline.llm.fast_engine import FastPhiEngine
from pipeline.llm.engine import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, TransformersEngine
from pipeline.spec import GenerationSettings

PROMPTS = [[5, 17, 99, 3], [42] * 11, list(range(100, 140)), [7], [300, 12, 12, 450, 8, 1, 77]]
GREEDY = GenerationSettings(max_new_tokens=24)


@pytest.fixture(scope="module")
def phi2_dir(request, tmp_path_factory):
    try:  # the shared session checkpoint, once tests/conftest.py provides it
        return request.getfixturevalue("tiny_phi2_dir")
    except pytest.FixtureLookupError:
        from pipeline.checkpoints import build_tiny_phi2

        return build_tiny_phi2(tmp_path_factory.mktemp("tiny_phi2"))


@pytest.fixture(scope="module")
def model(phi2_dir):
    from transformers import PhiForCausalLM

    return PhiForCausalLM.from_pretrained(phi2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def eos(model):
    return model.config.eos_token_id


@pytest.fixture(scope="module")
def fast(model, eos):
    return FastPhiEngine(model, eos, use_graphs=False, max_seq_len=256)


@pytest.fixture(scope="module")
def reference(model, eos):
    return TransformersEngine(model, eos)


def test_greedy_tokens_match_transformers_generate_prompt_by_prompt(fast, reference):
    for prompt in PROMPTS:
        ours = fast.generate([prompt], GREEDY)[0]
        theirs = reference.generate([prompt], GREEDY)[0]
        assert ours.token_ids == theirs.token_ids
        assert ours.finish_reason == theirs.finish_reason


def test_greedy_mixed_length_batch_matches_transformers_batch(fast, reference):
    ours = fast.generate(PROMPTS, GREEDY)
    theirs = reference.generate(PROMPTS, GREEDY)
    assert [g.token_ids for g in ours] == [g.token_ids for g in theirs]


def test_each_row_of_a_mixed_length_batch_matches_running_it_alone(fast):
    batch = fast.generate(PROMPTS, GREEDY)
    alone = [fast.generate([prompt], GREEDY)[0] for prompt in PROMPTS]
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in batch}) > 1  # the rows really differ


def test_fused_layer_path_gives_the_tokens_of_transformers(model, eos, reference):
    """From fused_min_rows rows up, a layer is two matrix products ([qkv | fc1], [dense | fc2])."""
    engine = FastPhiEngine(model, eos, use_graphs=False, max_seq_len=256, config=replace(DEFAULT_DECODE,
                                                                                         fused_min_rows=1))
    assert [g.token_ids for g in engine.generate(PROMPTS, GREEDY)] == \
        [g.token_ids for g in reference.generate(PROMPTS, GREEDY)]
    assert engine.generate([PROMPTS[2]], GREEDY)[0].token_ids == reference.generate([PROMPTS[2]], GREEDY)[0].token_ids


def test_engine_weights_are_views_of_the_models_weights(model, fast):
    """Stacking the projections copies nothing: the model's modules read the stacked tensors."""
    layer, block = fast.weights.layers[0], model.model.layers[0]
    assert block.self_attn.q_proj.weight.data_ptr() == layer.in_w.data_ptr()
    assert block.mlp.fc1.weight.data_ptr() == layer.fc1_w.data_ptr()
    assert block.mlp.fc2.weight.data_ptr() == layer.fc2_w.data_ptr()
    assert block.self_attn.dense.weight.data_ptr() == layer.out_w.data_ptr()
    again = FastPhiEngine(model, fast.eos_token_id, use_graphs=False, max_seq_len=256)  # reuses the views
    assert again.weights.layers[0].in_w.data_ptr() == layer.in_w.data_ptr()
    assert again.weights.layers[0].out_w.data_ptr() == layer.out_w.data_ptr()


def test_batches_larger_than_max_batch_size_run_in_groups(model, eos, fast):
    small = FastPhiEngine(model, eos, use_graphs=False, max_batch_size=2, max_seq_len=256)
    assert [g.token_ids for g in small.generate(PROMPTS, GREEDY)] == \
        [g.token_ids for g in fast.generate(PROMPTS, GREEDY)]


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed(fast):
    def sample(seed):
        settings = GenerationSettings(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=seed)
        return [g.token_ids for g in fast.generate(PROMPTS[:3], settings)]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert sample(7) != [g.token_ids for g in fast.generate(PROMPTS[:3], GREEDY)]


def test_top_p_near_zero_samples_the_greedy_token(fast):
    settings = GenerationSettings(max_new_tokens=24, temperature=1.0, top_p=1e-6, seed=3)
    assert [g.token_ids for g in fast.generate(PROMPTS, settings)] == \
        [g.token_ids for g in fast.generate(PROMPTS, GREEDY)]


def test_stop_check_finishes_the_row_with_reason_stop(model, eos, fast):
    greedy = fast.generate([PROMPTS[0], PROMPTS[2]], GREEDY)
    marker = greedy[0].token_ids[5]
    checked = []

    def stop_check(row, ids):
        checked.append(len(ids))
        return row == 0 and marker in ids

    engine = FastPhiEngine(model, eos, use_graphs=False, max_seq_len=256, check_every=4)
    out = engine.generate([PROMPTS[0], PROMPTS[2]], GREEDY, stop_check)
    assert out[0].finish_reason == FINISH_STOP
    assert marker in out[0].token_ids
    assert out[0].token_ids == greedy[0].token_ids[:len(out[0].token_ids)]
    assert len(out[0].token_ids) <= 8  # cut at the first check after the marker (every 4 steps)
    if marker not in greedy[1].token_ids:
        assert out[1].finish_reason == FINISH_LENGTH
    assert max(checked) <= GREEDY.max_new_tokens
    assert all(length % 4 == 0 for length in checked[:4])  # checked in chunks, not per token


def test_end_of_text_ends_the_row_like_transformers(model, fast):
    greedy = fast.generate([PROMPTS[1], PROMPTS[4]], GREEDY)
    pretend_eos = greedy[1].token_ids[6]  # any id can be end-of-text; this one appears mid-answer
    ours = FastPhiEngine(model, pretend_eos, use_graphs=False, max_seq_len=256)
    theirs = TransformersEngine(model, pretend_eos)
    batch = [PROMPTS[1], PROMPTS[4]]
    got, want = ours.generate(batch, GREEDY), theirs.generate(batch, GREEDY)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert got[1].finish_reason == FINISH_EOS
    assert pretend_eos not in got[1].token_ids
    assert len(got[1].token_ids) <= 6


def test_stream_yields_the_same_tokens_as_generate(model, fast):
    for prompt in PROMPTS[:3]:
        assert list(fast.stream(prompt, GREEDY)) == fast.generate([prompt], GREEDY)[0].token_ids
    pretend_eos = fast.generate([PROMPTS[2]], GREEDY)[0].token_ids[4]
    engine = FastPhiEngine(model, pretend_eos, use_graphs=False, max_seq_len=256)
    streamed = list(engine.stream(PROMPTS[2], GREEDY))
    assert streamed == engine.generate([PROMPTS[2]], GREEDY)[0].token_ids
    assert pretend_eos not in streamed


def test_generation_stops_at_the_cache_length(model, eos):
    engine = FastPhiEngine(model, eos, use_graphs=False, max_seq_len=32)
    out = engine.generate([list(range(10, 30))], GenerationSettings(max_new_tokens=50))[0]
    assert len(out.token_ids) <= 12
    with pytest.raises(InputTooLongError):
        engine.generate([list(range(10, 50))], GREEDY)


def test_the_block_pool_holds_what_a_call_needs_and_grows_by_half_at_least(model, eos):
    """The answer cache is a pool of blocks sized to what generate's rows need (prompt and answer),
    not a slot of the whole context per row; a pool that must grow takes 1.5x its blocks at least, so
    reallocations (and graph recaptures) stay few, and what its rows hold is kept."""
    from pipeline.llm.answer_cache import BLOCK_SIZE

    engine = FastPhiEngine(model, eos, use_graphs=False, max_seq_len=2048)
    prompts = [list(range(10, 30)), list(range(40, 45))]
    engine.generate(prompts, GenerationSettings(max_new_tokens=100))
    pool = engine.cache.blocks
    need = sum(-(-(len(p) + 100) // BLOCK_SIZE) for p in prompts) + 1  # and the trash block
    assert pool.total == need and pool.used == 0
    held = engine.cache.k
    engine.generate(prompts[:1], GenerationSettings(max_new_tokens=50))  # fits: kept as it is
    assert engine.cache.k is held
    engine.generate(prompts, GenerationSettings(max_new_tokens=300))
    assert engine.cache.blocks.total >= need * 3 // 2
    engine.cache.reserve(engine.cache.blocks.total + 1)
    before = engine.cache.k.clone()
    engine.cache.reserve(engine.cache.blocks.total * 2)
    assert torch.equal(engine.cache.k[:, :before.shape[1]], before)  # the blocks' contents go along


def test_unsupported_reason_names_non_phi_models_and_plain_cpu(model):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    assert "gpt2" in FastPhiEngine.unsupported_reason(gpt2, "cpu", use_graphs=False)
    assert FastPhiEngine.unsupported_reason(model, "cpu") is not None  # graphs need CUDA
    assert FastPhiEngine.unsupported_reason(model, "cpu", use_graphs=False) is None
    with pytest.raises(ModelLoadError):
        FastPhiEngine(gpt2, 0, use_graphs=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_give_the_same_tokens_as_the_eager_step(phi2_dir):
    from transformers import PhiForCausalLM

    gpu = PhiForCausalLM.from_pretrained(phi2_dir, dtype=torch.float32).eval().cuda()
    eos = gpu.config.eos_token_id
    graphs = FastPhiEngine(gpu, eos, max_batch_size=8)
    eager = FastPhiEngine(gpu, eos, use_graphs=False, use_triton=False)
    reference = TransformersEngine(gpu, eos)
    got = [g.token_ids for g in graphs.generate(PROMPTS, GREEDY)]
    assert got == [g.token_ids for g in eager.generate(PROMPTS, GREEDY)]
    assert got == [g.token_ids for g in reference.generate(PROMPTS, GREEDY)]
    assert list(graphs.stream(PROMPTS[2], GREEDY)) == got[2]
    for beside in (True, False):  # the layer paths of batches past 16 rows
        config = replace(DEFAULT_DECODE, fused_min_rows=1, mlp_beside_attention=beside)
        fused = FastPhiEngine(gpu, eos, max_batch_size=8, config=config)
        assert [g.token_ids for g in fused.generate(PROMPTS, GREEDY)] == got


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the second stream needs a GPU")
def test_mlp_beside_attention_computes_the_fused_layer(phi2_dir):
    """The decode step with the MLP on a second stream (cuBLASLt's GELU on fc1) against the one-stream
    layer (the GELU as gelu_new): the same logits in fp32, so the GELU is the tanh form phi-2 uses."""
    from transformers import PhiForCausalLM

    from pipeline.kernels.phi_attention import triton
    from pipeline.llm.phi_model import DecodeState, decode_step
    from pipeline.llm.phi_weights import phi_weights, rope_tables

    gpu = PhiForCausalLM.from_pretrained(phi2_dir, dtype=torch.float32).eval().cuda()
    w = phi_weights(gpu)
    cos, sin = rope_tables(w, 64)
    rows, columns, col = 24, 64, 40
    gen = torch.Generator().manual_seed(7)
    long = dict(dtype=torch.long, device="cuda")
    size = 32
    per_row = columns // size
    cache = torch.randn(2, len(w.layers), 1 + rows * per_row, w.heads, size, w.head_dim, generator=gen).cuda()
    table = (torch.randperm(rows * per_row, generator=gen) + 1).view(rows, per_row).cuda()
    starts = torch.randint(0, col, (rows,), generator=gen).cuda()
    tokens = torch.randint(0, gpu.config.vocab_size, (rows,), generator=gen).cuda()
    logits = {}
    for beside in (True, False):
        state = DecodeState(tokens.clone(), col - starts, torch.tensor([col], **long), starts, cache[0].clone(),
                            cache[1].clone(), table, size)
        logits[beside] = decode_step(w, state, cos, sin, use_triton=triton is not None,
                                     config=replace(DEFAULT_DECODE, mlp_beside_attention=beside))
    error = (logits[True] - logits[False]).norm() / logits[False].norm()
    assert error < 1e-5, error.item()


def _triton_checkable() -> bool:
    import os

    from pipeline.kernels.phi_attention import triton

    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not _triton_checkable(), reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("head_dim", [80, 16])
@pytest.mark.parametrize("rope_in_attention", [True, False])
@pytest.mark.parametrize("own_columns", [False, True])
def test_every_triton_attention_variant_matches_attention_over_the_valid_columns(head_dim, rope_in_attention,
                                                                                 own_columns):
    """Each kernel/tile variant the benchmark may pick: rope + cache write + attention over start..col,
    as one kernel or as a rotary kernel and an attention kernel; with one column for every row or each
    row's own, past which nothing is read; every row's columns in blocks of the paged cache, found
    through its block table (blocks shuffled but for two rows' consecutive ones, the pool's other blocks
    full of other values)."""
    from types import SimpleNamespace

    from pipeline.kernels.attention_tiles import ATTENTION_TILES, AttentionConfig
    from pipeline.kernels.phi_attention import triton_attention
    from pipeline.llm.phi_model import DecodeState

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(head_dim)
    batch, heads, columns, col, rot = 4, 2, 48, 37, head_dim // 4 * 2
    starts = torch.tensor([0, 5, 30, col])  # the last row's only column is this step's
    cols = torch.tensor([col, 20, 44, col]) if own_columns else torch.full((batch,), col)
    size = 32  # columns per block: a multiple of every tile's block_n
    per_row = -(-columns // size) + 1  # a table wider than the columns, not a power of two wide
    pool = 1 + batch * per_row + 3
    # rows 0 and 2 hold consecutive blocks (row 2's third, which it does not reach, is not the next)
    others = (torch.randperm(pool - 6, generator=gen) + 6).tolist()
    table = torch.tensor([[1, 2, 3], others[:3], [4, 5, others[3]], others[4:7]])
    k_pool = torch.randn(pool, heads, size, head_dim, generator=gen).to(device)
    v_pool = torch.randn(pool, heads, size, head_dim, generator=gen).to(device)
    logical = torch.arange(per_row * size)
    where = table[:, logical // size], logical % size  # [batch, columns] each: a row's column's block, offset

    def rows_columns(paged):  # [batch, heads, columns, head_dim] as the rows read them
        return paged.cpu()[where[0], :, where[1]].permute(0, 2, 1, 3)[:, :, :columns]

    k_cache, v_cache = rows_columns(k_pool), rows_columns(v_pool)
    qkv = torch.randn(batch, 3 * heads * head_dim, generator=gen).to(device)
    positions = cols - starts
    angles = torch.rand(64, rot // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(device), torch.cat([angles.sin()] * 2, -1).to(device)
    w = SimpleNamespace(heads=heads, head_dim=head_dim, rotary_dim=rot)

    # reference in float64: rotate q and k (rotate_half), attend over columns start..col
    q, k, v = qkv.double().cpu().view(batch, 3, heads, head_dim).unbind(1)
    c, s = cos.double().cpu()[positions][:, None], sin.double().cpu()[positions][:, None]

    def rotate(x):
        half = rot // 2
        r = x[..., :rot]
        return torch.cat((r * c + torch.cat((-r[..., half:], r[..., :half]), -1) * s, x[..., rot:]), -1)

    keys, values = k_cache.double().cpu().clone(), v_cache.double().cpu().clone()
    rows = torch.arange(batch)
    keys[rows, :, cols], values[rows, :, cols] = rotate(k), v
    scores = torch.einsum("bhd,bhnd->bhn", rotate(q), keys) / head_dim ** 0.5
    n = torch.arange(columns)
    scores = scores.masked_fill(~((n >= starts[:, None]) & (n <= cols[:, None]))[:, None], float("-inf"))
    want = torch.einsum("bhn,bhnd->bhd", scores.softmax(-1), values).reshape(batch, -1)

    configs = {AttentionConfig(kernel, 16, 2, stages, splits, split_dims)
               for kernel in ("sum", "dot") for stages in (1, 3) for splits in (1, 3) for split_dims in (True, False)}
    configs |= {c for _, c in ATTENTION_TILES}  # and the ones in use, also reading the row's table once
    configs |= {replace(c, table_once=True) for c in configs if c.stages == 3 or c in dict(ATTENTION_TILES).values()}
    configs |= {replace(c, consecutive=True) for c in configs if c.table_once and c.kernel == "dot"}
    configs |= {AttentionConfig(kernel, 64, 2, 3, splits) for kernel in ("sum", "dot") for splits in (1, 3)}  # 2 blocks
    for config in sorted(configs, key=str):
        kc, vc = k_pool.clone(), v_pool.clone()
        state = DecodeState(torch.zeros(batch, dtype=torch.long, device=device), positions.to(device),
                            (cols if own_columns else torch.tensor([col])).to(device), starts.to(device), kc, vc,
                            table.to(device), size)
        wide = torch.full((batch, heads * head_dim + 24), float("nan"), device=device)  # strided rows
        got = triton_attention(qkv, state, kc, vc, cos, sin, w, config, out=wide[:, 8:-16],
                               rope_inside=rope_in_attention)
        assert got.data_ptr() == wide[:, 8:-16].data_ptr() and not wide[:, 8:-16].isnan().any()
        assert wide[:, :8].isnan().all() and wide[:, -16:].isnan().all()  # nothing written beside it
        got = got.double().cpu()
        error = (got - want).norm() / want.norm()
        assert error < 1e-5, (config, error.item())
        written = kc.cpu()[table[rows, cols // size], :, cols % size].double()
        assert torch.allclose(written, keys[rows, :, cols], atol=1e-5)
        untouched = torch.ones(pool, size, dtype=torch.bool)
        untouched[table[rows, cols // size], cols % size] = False
        assert torch.equal(kc.cpu().permute(0, 2, 1, 3)[untouched], k_pool.cpu().permute(0, 2, 1, 3)[untouched])

    # the rotary kernel also applies the MLP's gelu_new where asked (strided rows, 38 columns per head
    # for 75 columns: the last head's share is partial)
    mlp = torch.randn(batch, 90, generator=gen).to(device) * 3
    expected = torch.nn.functional.gelu(mlp[:, 15:].double().cpu(), approximate="tanh")
    for kernel in ("dot", "sum"):
        wide = torch.full((batch, 100), float("nan"), device=device)
        triton_attention(qkv, state, kc, vc, cos, sin, w, AttentionConfig(kernel),
                         gelu=(mlp[:, 15:], wide[:, 20:95]), rope_inside=rope_in_attention)
        assert torch.allclose(wide[:, 20:95].double().cpu(), expected, atol=1e-5)
        assert wide[:, :20].isnan().all() and wide[:, 95:].isnan().all()


# the attention kernels reading each row's block table once, before their loop (AttentionConfig.table_once),
# and finding consecutive blocks by arithmetic (rows joined together hold consecutive blocks for their
# prompts, then interleaved ones as they grow side by side: both loops run)
TABLE_ONCE, CONSECUTIVE = (replace(DEFAULT_DECODE, attention_tiles=tuple(
    (rows, replace(config, table_once=True, consecutive=consecutive)) for rows, config in DEFAULT_DECODE.attention_tiles))
    for consecutive in (False, True))


@pytest.mark.skipif(not _triton_checkable(), reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
def test_engine_on_the_triton_kernels_gives_the_tokens_of_transformers(model, eos, reference):
    """Every kernel of the decode path at once (layer norm, skinny products, rotary + cache write in the
    prefill, rotary + attention in the step) and, from fused_min_rows rows on, the fused layer with the
    GELU inside the rotary kernel; on the CPU under Triton's interpreter (graphs and streams need CUDA)."""
    import copy
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":  # compiled kernels read GPU memory only
        model = copy.deepcopy(model).to("cuda")
        reference = TransformersEngine(model, eos)
    want = [g.token_ids for g in reference.generate(PROMPTS, GREEDY)]
    for config in (DEFAULT_DECODE, replace(DEFAULT_DECODE, fused_min_rows=1, mlp_beside_attention=False),
                   replace(DEFAULT_DECODE, rope_in_attention=False, pdl=False), TABLE_ONCE, CONSECUTIVE):
        engine = FastPhiEngine(model, eos, use_graphs=False, use_triton=True, max_seq_len=256, config=config)
        assert [g.token_ids for g in engine.generate(PROMPTS, GREEDY)] == want, config
