"""Fast MarianMT decoding in torch: static shapes, preallocated caches and CUDA graphs.

`MarianMTModel.generate` is bound by kernel launches on a GPU: every decode step runs a few hundred
small kernels from Python. Here each batch is padded to a (batch, source length, target length)
bucket; the encoder and the cross-attention keys/values run once per batch; the decoder's
self-attention cache is preallocated, time-major, so each step's key and value are written by
one GEMM straight into a contiguous slot; and the decode steps are captured as CUDA graphs, a few
steps per graph, one graph per step position (so positions, cache slices and the attention span
are static and self-attention needs no mask). The host checks "all rows done" once per graph,
one graph late, so the GPU never waits for it. A sentence's beams share its encoder keys and
values (they are its queries in cross-attention), and beam search reorders the self-attention
cache from one buffer into another in a single pass.

The weights are the loaded model's own tensors, read in place; the one copy is each decoder
layer's key and value projections concatenated (2 x d_model^2 per layer, 6 MB in fp16 at the
published shape), made on CUDA when the backend is built.

Decoding follows `TransformersMTBackend` exactly; the greedy and beam search steps are in
beam_search.py (greedy needs no step past the bound: the forced token would be cut off anyway).
The same code runs eagerly (`use_graphs=False`), e.g. on the CPU, where the tests check token
identity with `generate` in float32.

Where Triton is installed (the CUDA machines), three parts of each step run as Triton kernels
(`kernels`, in kernels/marian.py): "attention" (decode attention, reading beam search's history
through parent pointers, so the cache is never reordered), "norm" (the residual add fused into
each layer norm) and "top" (argmax / top-k with the log-softmax normaliser in one pass).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.gpu_gate import GATE
from pipeline.kernels.marian import add_layer_norm, decode_attention, triton
from pipeline.mt.beam_search import BeamState, SearchRules, beam_step, greedy_step
from pipeline.mt.contract import right_pad, strip_special

# Multiples of 16: the memory-efficient attention kernel wants its mask rows aligned.
LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
STEPS_PER_GRAPH = 4      # decode steps per graph launch; the host checks "all done" once per launch
MAX_ROWS = 1024          # batch x beams per launch: bounds the caches and logits in memory
MAX_SESSIONS = 16        # buckets whose buffers and graphs are kept
ATTENTION = ("sdpa", "efficient", "math")   # how decode steps attend (benchmarks compare them)
KERNEL_PARTS = ("attention", "norm", "top")   # the step's parts that Triton kernels can run


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    for size in buckets:
        if size >= n:
            return size
    raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


def _batch_bucket(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclass
class _Session:
    """Static buffers (and graphs) of one (batch, source length, target length, beams) bucket."""

    batch: int
    src_len: int
    tgt_len: int
    beams: int
    src_ids: torch.Tensor            # [batch, src_len]
    src_lengths: torch.Tensor        # [batch]
    src_bias: torch.Tensor           # [batch, 1, 1, src_len] additive cross-attention mask
    cross_k: list[torch.Tensor]      # per layer [batch, src_len, heads, head_dim]: beams share them
    cross_v: list[torch.Tensor]
    # Per layer [tgt_len, rows, 2 (key, value), heads, head_dim], time-major. Beam search keeps
    # two sets and reorders from one into the other at each step (one pass instead of two).
    self_kv: list[list[torch.Tensor]]
    tokens: torch.Tensor             # [rows] the decoder input of the next step
    finished: torch.Tensor           # [rows] greedy: the row has emitted </s>
    limit: torch.Tensor              # [1] decode steps of this batch
    force_at: torch.Tensor           # [1] the step that must emit </s> (-1: none)
    done: torch.Tensor               # [] bool: no row can change any more
    out: torch.Tensor                # greedy [rows, tgt_len]; beam: finished hypotheses [batch, beams, tgt_len]
    beam: BeamState | None = None    # beam search's hypotheses (beams > 1)
    graphs: list = field(default_factory=list)  # [prefill, steps 0..3, steps 4..7, ...]
    host_flags: torch.Tensor | None = None
    uses: int = 0  # batches run on it: the first runs eagerly, the graphs are captured at the second


class FastMarianBackend:
    """Greedy and beam decoding of a loaded MarianMTModel, reading its weights in place.

    `use_graphs` defaults to True on CUDA; without graphs the same steps run eagerly (CPU tests).
    `attention` picks the decode attention kernel ("sdpa", the default, measured fastest on H100).
    `kernels`: which parts of KERNEL_PARTS run as Triton kernels; default all of them with graphs
    on CUDA when Triton is installed, none otherwise.
    """

    name = "fast"
    # One set of static buffers (and graphs) per shape, and an LRU of them: two threads' batches of
    # one shape would write each other's sources. Callers on threads serialise (serve/translation.py).
    concurrent = False

    def __init__(self, model, use_graphs: bool | None = None, steps_per_graph: int = STEPS_PER_GRAPH,
                 max_rows: int = MAX_ROWS, attention: str = "sdpa", kernels=None):
        config = model.config
        if config.normalize_before or getattr(config, "add_final_layer_norm", False):
            raise ValueError("fast backend supports post-LN Marian checkpoints only")
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a model on a CUDA device")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}")
        self.attention = attention
        if kernels is None:
            kernels = KERNEL_PARTS if self.use_graphs and triton is not None else ()
        self.kernels = frozenset(kernels)
        if not self.kernels <= set(KERNEL_PARTS):
            raise ValueError(f"kernels must be among {KERNEL_PARTS}")
        if self.kernels and triton is None:
            raise ValueError("Triton kernels need Triton installed")
        # Beam search reads parent pointers instead of reordering the cache (attention kernel only).
        self.pointers = "attention" in self.kernels
        self.steps_per_graph = steps_per_graph
        self.max_rows = max_rows
        self.pad = config.pad_token_id
        self.eos = config.eos_token_id
        self.start = config.decoder_start_token_id
        self.forced_eos = getattr(model.generation_config, "forced_eos_token_id", None) is not None
        self.length_penalty = float(model.generation_config.length_penalty or 1.0)
        self.heads = config.decoder_attention_heads
        self.enc_heads = config.encoder_attention_heads
        self.width = config.d_model
        self.max_positions = config.max_position_embeddings
        self.encoder, self.decoder = model.model.encoder, model.model.decoder
        self.lm_head = model.lm_head.weight
        self.logits_bias = model.final_logits_bias[0]
        self.rules = SearchRules(pad=self.pad, eos=self.eos, forced_eos=self.forced_eos,
                                 length_penalty=self.length_penalty, steps_per_graph=steps_per_graph,
                                 top_kernel="top" in self.kernels, pointers=self.pointers)
        self.sessions: OrderedDict[tuple, _Session] = OrderedDict()
        self.pool = None
        self.kv_weights = self._fused_kv() if self.use_graphs else None

    def _fused_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's key and value projections as one [2 * d_model, d_model] matrix, the
        one copy of weights made here: one GEMM then writes a step's key and value in place."""
        fused = []
        for layer in self.decoder.layers:
            k, v = layer.self_attn.k_proj, layer.self_attn.v_proj
            bias = (torch.cat((k.bias, v.bias)) if k.bias is not None
                    else torch.zeros(2 * self.width, dtype=self.dtype, device=self.device))
            fused.append((torch.cat((k.weight, v.weight)).detach(), bias.detach()))
        return fused

    # ---- public contract -------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, batch: list[list[int]], max_new_tokens: int, num_beams: int) -> list[list[int]]:
        results: list[list[int] | None] = [None] * len(batch)
        for indices, rows in self._plan(batch, num_beams):
            for index, ids in zip(indices, self._run(rows, max_new_tokens, num_beams)):
                results[index] = strip_special(ids, self.eos, self.pad, max_new_tokens)
        return results

    def _plan(self, batch: list[list[int]], beams: int):
        """Length-bucketed groups of at most max_rows / beams rows, shortest first."""
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        per_launch = max(1, self.max_rows // beams)
        group: list[int] = []
        for i in order:
            same_bucket = not group or (_bucket(len(batch[i]), LENGTH_BUCKETS)
                                        == _bucket(len(batch[group[0]]), LENGTH_BUCKETS))
            if group and (not same_bucket or len(group) == per_launch):
                yield group, [batch[j] for j in group]
                group = []
            group.append(i)
        if group:
            yield group, [batch[j] for j in group]

    # ---- one padded batch ------------------------------------------------------------------

    def _run(self, rows: list[list[int]], max_new_tokens: int, beams: int) -> list[list[int]]:
        # Beam search scores the step generate adds past the bound (see the module docstring).
        limit = max_new_tokens if beams == 1 else max_new_tokens + 1
        src_len = _bucket(max(len(r) for r in rows), LENGTH_BUCKETS)
        tgt_len = _bucket(limit, LENGTH_BUCKETS)
        if src_len > self.max_positions or tgt_len > self.max_positions:
            raise ValueError(f"sequence longer than the model's {self.max_positions} positions")
        s = self._session(_batch_bucket(len(rows)), src_len, tgt_len, beams)
        # A shape seen once runs eagerly: capturing its 1 + tgt_len/4 graphs costs far more than one
        # eager batch (a cold `ask` translates one question and one answer, each once). A shape that
        # comes back (a job, a server) is captured and replayed from then on.
        replay = self.use_graphs and (bool(s.graphs) or s.uses > 0)
        if replay and not s.graphs:
            self._capture(s)
        s.uses += 1
        self._load(s, rows, limit, limit - 1 if beams > 1 and self.forced_eos else -1)
        chunks = -(-limit // self.steps_per_graph)
        if replay:
            self._replay(s, chunks)
        else:
            self._prefill(s)
            for chunk in range(chunks):
                self._chunk(s, chunk)
                if bool(s.done):
                    break
        out = s.out if beams == 1 else s.out[:, 0]
        return out[: len(rows)].tolist()

    @staticmethod
    def _replay(s: _Session, chunks: int) -> None:
        """Replay prefill and step graphs until every row is done, reading the flag one graph late."""
        s.graphs[0].replay()
        events = [torch.cuda.Event(), torch.cuda.Event()]
        for n in range(chunks):
            s.graphs[1 + n].replay()
            s.host_flags[n % 2].copy_(s.done, non_blocking=True)
            events[n % 2].record()
            if n > 0:
                events[(n - 1) % 2].synchronize()
                if bool(s.host_flags[(n - 1) % 2]):
                    return

    def _load(self, s: _Session, rows: list[list[int]], limit: int, force_at: int) -> None:
        fillers = [[self.eos]] * (s.batch - len(rows))   # a one-token source pads the batch bucket
        ids, lengths = right_pad(rows + fillers, self.pad, s.src_len)
        s.src_ids.copy_(ids, non_blocking=True)
        s.src_lengths.copy_(lengths, non_blocking=True)
        s.limit.fill_(limit)
        s.force_at.fill_(force_at)

    # ---- buffers and graphs ----------------------------------------------------------------

    def _session(self, batch: int, src_len: int, tgt_len: int, beams: int) -> _Session:
        key = (batch, src_len, tgt_len, beams)
        if key in self.sessions:
            self.sessions.move_to_end(key)
            return self.sessions[key]
        while len(self.sessions) >= MAX_SESSIONS:
            self.sessions.popitem(last=False)
        s = self._allocate(batch, src_len, tgt_len, beams)  # captured at its second batch (_run)
        self.sessions[key] = s
        return s

    def _allocate(self, batch: int, src_len: int, tgt_len: int, beams: int) -> _Session:
        rows, dev, dt = batch * beams, self.device, self.dtype
        head_dim = self.width // self.heads
        layers = len(self.decoder.layers)
        # Zeros, not empty: stale slots must hold finite numbers.
        cross = lambda: [torch.zeros(batch, src_len, self.heads, head_dim, device=dev, dtype=dt)
                         for _ in range(layers)]
        cache = lambda: [torch.zeros(tgt_len, rows, 2, self.heads, head_dim, device=dev, dtype=dt)
                         for _ in range(layers)]
        long = dict(dtype=torch.long, device=dev)
        s = _Session(
            batch=batch, src_len=src_len, tgt_len=tgt_len, beams=beams,
            src_ids=torch.full((batch, src_len), self.pad, **long),
            src_lengths=torch.ones(batch, **long),
            src_bias=torch.zeros(batch, 1, 1, src_len, device=dev, dtype=dt),
            cross_k=cross(), cross_v=cross(),
            self_kv=[cache()] + ([cache()] if beams > 1 and not self.pointers else []),
            tokens=torch.full((rows,), self.start, **long),
            finished=torch.zeros(rows, dtype=torch.bool, device=dev),
            limit=torch.ones(1, **long),
            force_at=torch.full((1,), -1, **long),
            done=torch.zeros((), dtype=torch.bool, device=dev),
            out=torch.full((rows, tgt_len) if beams == 1 else (batch, beams, tgt_len), self.pad, **long),
        )
        if beams > 1:
            s.beam = BeamState.allocate(batch, beams, tgt_len, self.pad, dev)
        return s

    def _capture(self, s: _Session) -> None:
        with GATE.capture():  # no other thread's GPU work (a server's phi-2) meanwhile
            self._capture_session(s)

    def _capture_session(self, s: _Session) -> None:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # Warm up on a side stream (cuBLAS handles, workspaces) before capturing, as torch requires.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._prefill(s)
            self._chunk(s, 0)
        torch.cuda.current_stream().wait_stream(side)
        chunks = s.tgt_len // self.steps_per_graph
        # One pool for all: the graphs run one after another and keep their state in the static
        # buffers above, never in the pool.
        for n in range(1 + chunks):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                if n == 0:
                    self._prefill(s)
                else:
                    self._chunk(s, n - 1)
            s.graphs.append(graph)
        s.host_flags = torch.zeros(2, dtype=torch.bool, pin_memory=True)
        torch.cuda.synchronize()

    # ---- the model, on static buffers ----------------------------------------------------

    def _prefill(self, s: _Session) -> None:
        """Encode the sources, write the cross-attention keys/values, reset the decoding state."""
        enc = self.encoder
        valid = torch.arange(s.src_len, device=s.src_ids.device)[None, :] < s.src_lengths[:, None]
        mask = valid[:, None, None, :]
        x = enc.embed_tokens(s.src_ids) * enc.embed_scale + enc.embed_positions.weight[: s.src_len]
        for layer in enc.layers:
            a = layer.self_attn
            o = F.scaled_dot_product_attention(
                self._split(a.q_proj(x), self.enc_heads), self._split(a.k_proj(x), self.enc_heads),
                self._split(a.v_proj(x), self.enc_heads), attn_mask=mask)
            x = layer.self_attn_layer_norm(x + a.out_proj(o.transpose(1, 2).flatten(2)))
            x = layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x))))
        s.src_bias.zero_().masked_fill_(~mask, float("-inf"))
        for i, layer in enumerate(self.decoder.layers):
            c = layer.encoder_attn
            s.cross_k[i].copy_(c.k_proj(x).view(s.cross_k[i].shape))
            s.cross_v[i].copy_(c.v_proj(x).view(s.cross_v[i].shape))
        s.tokens.fill_(self.start)
        s.finished.zero_()
        s.done.zero_()
        s.out.fill_(self.pad)
        if s.beams > 1:
            s.beam.reset(self.pad)

    @staticmethod
    def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
        """[rows, length, d_model] -> [rows, heads, length, head_dim]"""
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)

    def _chunk(self, s: _Session, chunk: int) -> None:
        first = chunk * self.steps_per_graph
        for t in range(first, first + self.steps_per_graph):
            if s.beams == 1:
                greedy_step(s, t, self._logits(s, t, s.tokens if t == 0 else s.out[:, t - 1]), self.rules)
            else:
                beam_step(s, t, self._logits(s, t, s.tokens), self.rules)

    def _logits(self, s: _Session, t: int, ids: torch.Tensor) -> torch.Tensor:
        """Decoder step `t` for every row, fed `ids`: logits [rows, vocab] (bias included)."""
        dec = self.decoder
        rows = ids.shape[0]
        # [rows, d_model]: linear layers fold generate's [rows, 1, d_model] to this same GEMM
        x = dec.embed_tokens(ids) * dec.embed_scale + dec.embed_positions.weight[t]
        for i, layer in enumerate(dec.layers):
            a, c = layer.self_attn, layer.encoder_attn
            o = self._self_attention(s, t, i, a, x)
            x = self._add_norm(x, a.out_proj(o), layer.self_attn_layer_norm)
            o = self._cross_attention(s, i, c.q_proj(x))
            x = self._add_norm(x, c.out_proj(o), layer.encoder_attn_layer_norm)
            x = self._add_norm(x, layer.fc2(layer.activation_fn(layer.fc1(x))), layer.final_layer_norm)
        if self.use_graphs:   # the bias in the GEMM's epilogue: one pass over the logits fewer
            return F.linear(x, self.lm_head, self.logits_bias)
        return F.linear(x, self.lm_head) + self.logits_bias   # generate's arithmetic

    def _self_attention(self, s: _Session, t: int, i: int, a, x: torch.Tensor) -> torch.Tensor:
        """Write step t's key and value, attend over positions 0..t: [rows, d_model]."""
        rows = x.shape[0]
        cache = s.self_kv[t % len(s.self_kv)][i]
        self._write_kv(i, a, x, cache[t])
        q = a.q_proj(x)
        if "attention" in self.kernels:
            origin = s.beam.origin[t % 2] if s.beams > 1 else None
            return decode_attention(q, cache[:, :, 0], cache[:, :, 1], t + 1, self.heads,
                                    cache.stride(0), cache.stride(1), origin=origin)
        kv = cache[: t + 1].permute(1, 3, 0, 2, 4)      # [rows, heads, t + 1, 2, head_dim]
        q = q.view(rows, 1, self.heads, -1).transpose(1, 2)
        o = self._attend(q, kv[..., 0, :], kv[..., 1, :], None)
        return o.transpose(1, 2).reshape(rows, -1)

    def _cross_attention(self, s: _Session, i: int, q: torch.Tensor) -> torch.Tensor:
        """A sentence's beams are its queries, against its encoder keys read once for all beams."""
        rows = q.shape[0]
        k, v = s.cross_k[i], s.cross_v[i]
        if "attention" in self.kernels:
            return decode_attention(q, k, v, s.src_len, self.heads, k.stride(1), k.stride(0),
                                    lengths=s.src_lengths, group=s.beams)
        q = q.view(s.batch, s.beams, self.heads, -1).transpose(1, 2)   # [batch, heads, beams, head_dim]
        o = self._attend(q, k.transpose(1, 2), v.transpose(1, 2), s.src_bias)
        return o.transpose(1, 2).reshape(rows, -1)

    def _add_norm(self, x: torch.Tensor, y: torch.Tensor, norm) -> torch.Tensor:
        if "norm" in self.kernels:
            return add_layer_norm(x, y, norm.weight, norm.bias, norm.eps)
        return norm(x + y)

    def _attend(self, q, k, v, bias):
        if self.attention == "math":   # decode queries are one row: plain GEMMs may beat tiled kernels
            scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
            if bias is not None:
                scores = scores + bias
            return torch.matmul(torch.softmax(scores, -1), v)
        if self.attention == "efficient":
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def _write_kv(self, i: int, attention, x: torch.Tensor, slot: torch.Tensor) -> None:
        """This step's key and value, written into their slot [rows, 2, heads, head_dim] of the cache."""
        rows = x.shape[0]
        if self.kv_weights is not None:   # one GEMM writing in place
            weight, bias = self.kv_weights[i]
            torch.addmm(bias, x.view(rows, -1), weight.t(), out=slot.view(rows, -1))
        else:   # exactly generate's arithmetic, for the float32 identity checks
            slot[:, 0].copy_(attention.k_proj(x).view(rows, self.heads, -1))
            slot[:, 1].copy_(attention.v_proj(x).view(rows, self.heads, -1))
