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

Decoding follows `TransformersMTBackend` exactly (greedy, and the vectorised beam search of
transformers >= 4.50 with its length penalty and `early_stopping=True`): pad is never generated,
finished rows emit pad, and beam search runs one step past the bound with end-of-sentence forced
there, as `generate(max_new_tokens=bound + 1)` does (greedy needs no such step: the forced token
would be cut off anyway). The same code runs eagerly (`use_graphs=False`), e.g. on the CPU, where
the tests check token identity with `generate` in float32.

Where Triton is installed (the CUDA machines), three parts of each step run as Triton kernels
(`kernels`): "attention", a decode-attention kernel for one query row against the cache (SDPA's
tiles are 64 query rows wide and waste most of their work here), which also reads beam search's
history through parent pointers (the row each cached position came from), so the cache is never
reordered; "norm", the residual add fused into each layer norm; and "top", the vocabulary's
argmax and beam search's top-k in two stages (each 2048-column chunk's best, then the best
chunks'), with the log-softmax normaliser from the same pass, so the [rows, vocab] log
probabilities are never written.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.mt.backends import strip_special

try:   # on the CUDA machines; the CPU path needs none of it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Multiples of 16: the memory-efficient attention kernel wants its mask rows aligned.
LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
STEPS_PER_GRAPH = 4      # decode steps per graph launch; the host checks "all done" once per launch
MAX_ROWS = 1024          # batch x beams per launch: bounds the caches and logits in memory
MAX_SESSIONS = 16        # buckets whose buffers and graphs are kept
ATTENTION = ("sdpa", "efficient", "math")   # how decode steps attend (benchmarks compare them)
KERNEL_PARTS = ("attention", "norm", "top")   # the step's parts that Triton kernels can run
TOP_BLOCK = 2048          # vocabulary columns per program of the two-stage argmax / top-k
ATTENTION_BLOCK = 64      # cache positions per iteration of the decode-attention kernel


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
    beam: dict = field(default_factory=dict)   # beam-search state
    graphs: list = field(default_factory=list)  # [prefill, steps 0..3, steps 4..7, ...]
    host_flags: torch.Tensor | None = None


class FastMarianBackend:
    """Greedy and beam decoding of a loaded MarianMTModel, reading its weights in place.

    `use_graphs` defaults to True on CUDA; without graphs the same steps run eagerly (CPU tests).
    `attention` picks the decode attention kernel ("sdpa", the default, measured fastest on H100).
    `kernels`: which parts of KERNEL_PARTS run as Triton kernels; default all of them with graphs
    on CUDA when Triton is installed, none otherwise.
    """

    name = "fast"

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
        self.sessions: OrderedDict[tuple, _Session] = OrderedDict()
        self.pool = None
        self.kv_weights = self._fused_kv() if self.use_graphs else None

    def _fused_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's key and value projections as one [2 * d_model, d_model] matrix.

        The one copy of weights this backend makes (2 x d_model^2 per layer, 6 MB in fp16 at the
        published shape): one GEMM then writes a step's key and value into the cache in place.
        """
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
        self._load(s, rows, limit, limit - 1 if beams > 1 and self.forced_eos else -1)
        chunks = -(-limit // self.steps_per_graph)
        if self.use_graphs:
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
        padded = [row + [self.pad] * (s.src_len - len(row)) for row in rows + fillers]
        s.src_ids.copy_(torch.tensor(padded), non_blocking=True)
        s.src_lengths.copy_(torch.tensor([len(row) for row in rows + fillers]), non_blocking=True)
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
        s = self._allocate(batch, src_len, tgt_len, beams)
        if self.use_graphs:
            self._capture(s)
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
            f32 = dict(dtype=torch.float32, device=dev)
            s.beam.update(
                run_seq=torch.full((batch, beams, tgt_len), self.pad, **long),
                run_scores=torch.zeros((batch, beams), **f32),
                fin_scores=torch.zeros((batch, beams), **f32),
                fin_flag=torch.zeros((batch, beams), dtype=torch.bool, device=dev),
                open=torch.ones((batch, 1), dtype=torch.bool, device=dev),
                top_mask=torch.arange(2 * beams, device=dev) < beams,
                row_offset=torch.arange(batch, device=dev)[:, None] * beams,
                forced_parent=torch.arange(beams, device=dev).repeat(2),
                # [tgt_len, rows]: the row whose cache slot holds each position of a row's history
                # (two sets: one step's gather reads one and writes the other).
                origin=[torch.zeros(tgt_len, rows, dtype=torch.int32, device=dev) for _ in range(2)],
                row_ids=torch.arange(rows, dtype=torch.int32, device=dev),
            )
        return s

    def _capture(self, s: _Session) -> None:
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
            b = s.beam
            b["run_seq"].fill_(self.pad)
            # Only the first beam is live at the start, so beams do not all pick the same token.
            b["run_scores"].fill_(-1e9)
            b["run_scores"][:, 0] = 0.0
            b["fin_scores"].fill_(-1e9)
            b["fin_flag"].zero_()
            b["open"].fill_(True)
            for origin in b["origin"]:   # each position starts as the row's own slot
                origin.copy_(b["row_ids"].expand_as(origin))

    @staticmethod
    def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
        """[rows, length, d_model] -> [rows, heads, length, head_dim]"""
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)

    def _chunk(self, s: _Session, chunk: int) -> None:
        first = chunk * self.steps_per_graph
        for t in range(first, first + self.steps_per_graph):
            if s.beams == 1:
                self._greedy_step(s, t)
            else:
                self._beam_step(s, t)

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
            origin = s.beam["origin"][t % 2] if s.beams > 1 else None
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

    def _greedy_step(self, s: _Session, t: int) -> None:
        logits = self._logits(s, t, s.tokens if t == 0 else s.out[:, t - 1])
        if "top" in self.kernels:
            best = chunk_top(logits, self.pad, 1)[1][:, 0]
        else:
            logits[:, self.pad] = float("-inf")   # bad_words_ids [[pad]]: generate never emits pad
            best = logits.argmax(-1)
        token = torch.where(s.finished, self.pad, best)   # finished rows emit pad
        s.out[:, t] = token
        s.finished.logical_or_(token == self.eos)
        if (t + 1) % self.steps_per_graph == 0:   # only the host reads it, once per graph
            s.done.copy_(s.finished.all() | (s.limit <= t + 1)[0])

    def _beam_candidates(self, s: _Session, t: int):
        """The 2k best (score, parent beam, token) of each sentence, best first."""
        b, k, batch = s.beam, s.beams, s.batch
        logits = self._logits(s, t, s.tokens)
        if "top" in self.kernels:
            # Each chunk's 2k best logits and log-sum-exp; a row's global 2k best are among them.
            values, index, chunk_max, chunk_sum = chunk_top(logits, self.pad, 2 * k, stats=True)
            top = chunk_max.amax(1, keepdim=True)
            lse = top + torch.log((chunk_sum * torch.exp(chunk_max - top)).sum(1, keepdim=True))
            per_row = values.shape[1]
            scores = (values - lse + b["run_scores"].view(-1, 1)).view(batch, k * per_row)
            top_scores, position = scores.topk(2 * k)
            return top_scores, position // per_row, torch.gather(index.view(batch, -1), 1, position)
        vocab = logits.shape[1]
        log_probs = torch.log_softmax(logits, -1, dtype=torch.float32)
        log_probs[:, self.pad] = float("-inf")   # generate masks bad words after the softmax
        scores = (log_probs.view(batch, k, vocab) + b["run_scores"][:, :, None]).view(batch, k * vocab)
        top_scores, top_index = scores.topk(2 * k)
        return top_scores, top_index // vocab, top_index % vocab

    def _beam_step(self, s: _Session, t: int) -> None:
        """One step of transformers' vectorised beam search (early_stopping=True)."""
        b, k, batch = s.beam, s.beams, s.batch
        top_scores, parent, token = self._beam_candidates(s, t)
        if self.forced_eos:
            # At the forced step every beam's only finite continuation is </s> at its own score;
            # the top 2k are those k (already sorted) and k at -inf. Set them directly rather
            # than pass over the whole [rows, vocab] tensor again.
            forced = s.force_at == t
            minus_inf = torch.full_like(b["run_scores"], float("-inf"))
            top_scores = torch.where(forced, torch.cat((b["run_scores"], minus_inf), 1), top_scores)
            parent = torch.where(forced, b["forced_parent"], parent)
            token = torch.where(forced, self.eos, token)
        top_seq = torch.take_along_dim(b["run_seq"], parent[:, :, None], 1)
        top_seq[:, :, t] = token
        hits = (token == self.eos) | (s.limit <= t + 1)
        # The best k continuations that did not just finish stay running.
        running = top_scores + hits.float() * -1.0e9
        keep = running.topk(k)[1]
        b["run_seq"].copy_(torch.take_along_dim(top_seq, keep[:, :, None], 1))
        b["run_scores"].copy_(torch.take_along_dim(running, keep, 1))
        rows = (torch.take_along_dim(parent, keep, 1) + b["row_offset"]).view(-1)
        # Finished hypotheses among the top k compete, length-normalised, for the k final places.
        just_finished = hits & b["top_mask"][None]
        candidate = top_scores / ((t + 1) ** self.length_penalty)
        candidate = candidate + b["fin_flag"].all(1, keepdim=True).float() * -1.0e9
        candidate = candidate + (~b["open"]).float() * -1.0e9
        candidate = candidate + (~just_finished).float() * -1.0e9
        merged_scores = torch.cat((b["fin_scores"], candidate), 1)
        best = merged_scores.topk(k)[1]
        s.out.copy_(torch.take_along_dim(torch.cat((s.out, top_seq), 1), best[:, :, None], 1))
        b["fin_scores"].copy_(torch.take_along_dim(merged_scores, best, 1))
        b["fin_flag"].copy_(torch.take_along_dim(torch.cat((b["fin_flag"], just_finished), 1), best, 1))
        if self.pointers:   # running beams continue their parents' histories: gather the pointers
            now, after = b["origin"][t % 2], b["origin"][(t + 1) % 2]
            torch.index_select(now[: t + 1], 1, rows, out=after[: t + 1])
        else:   # running beams continue their parents' caches: gather into the other set
            for now, after in zip(s.self_kv[t % 2], s.self_kv[(t + 1) % 2]):
                torch.index_select(now[: t + 1], 1, rows, out=after[: t + 1])
        s.tokens.copy_(b["run_seq"][:, :, t].reshape(-1))
        # Can a running beam still beat the worst finished one? (transformers' heuristic)
        best_running = b["run_scores"][:, :1] / ((t + 1) ** self.length_penalty)
        worst = torch.where(b["fin_flag"], b["fin_scores"].min(1, keepdim=True)[0], -1.0e9)
        b["open"].logical_and_((best_running > worst).any(1, keepdim=True))
        still = b["open"].any() & ~b["fin_flag"].all() & ~hits.all()
        s.done.copy_(~still)


# ---- Triton kernels (CUDA; the tests also run them in Triton's CPU interpreter) --------------

def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: int, heads: int,
                     stride_t: int, stride_r: int, origin: torch.Tensor | None = None,
                     lengths: torch.Tensor | None = None, group: int = 1) -> torch.Tensor:
    """Attention of one query row per (row, head) over `span` cached positions: [rows, d_model].

    q: [rows, d_model]. k, v: position t of key row r at offset t * stride_t + r * stride_r (then
    head, head_dim contiguous). Row r reads key row r // group (a sentence's beams share its
    encoder keys), or, given `origin` [positions, rows], key row origin[t, r] at position t (beam
    search's parent pointers). `lengths` [key rows]: positions past a row's length are masked.
    """
    rows, width = q.shape
    head_dim = width // heads
    out = torch.empty_like(q)
    _decode_attention_kernel[(rows, heads)](
        q, k, v, out, origin if origin is not None else q, lengths if lengths is not None else q,
        span, stride_t, stride_r, origin.stride(0) if origin is not None else 0, head_dim ** -0.5,
        HEADS=heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), GROUP=group,
        USE_ORIGIN=origin is not None, USE_LENGTHS=lengths is not None, BLOCK_N=ATTENTION_BLOCK,
        num_warps=4)
    return out


def add_layer_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """layer_norm(x + y) over the last dim of [rows, width] tensors, in one pass."""
    rows, width = x.shape
    out = torch.empty_like(x)
    _add_layer_norm_kernel[(rows,)](x, y, weight, bias, out, width, eps,
                                    BLOCK=triton.next_power_of_2(width), num_warps=4)
    return out


def chunk_top(logits: torch.Tensor, pad: int, k: int, stats: bool = False):
    """Two-stage top-k of each row of logits [rows, vocab], pad excluded.

    k == 1 (greedy): (values, index) [rows, 1] of each row's first largest logit. Else (values,
    index) [rows, chunks * k] hold each chunk's k best (float32 logits, vocabulary ids), a superset
    of the row's k best; with `stats`, also each chunk's max and sum of exp(logit - max) [rows,
    chunks], pad included (generate masks pad after the softmax).
    """
    rows, vocab = logits.shape
    chunks = triton.cdiv(vocab, TOP_BLOCK)
    values = torch.empty(rows, chunks * k, dtype=torch.float32, device=logits.device)
    index = torch.empty(rows, chunks * k, dtype=torch.long, device=logits.device)
    chunk_max = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device) if stats else values
    chunk_sum = torch.empty_like(chunk_max) if stats else values
    _chunk_top_kernel[(rows, chunks)](logits, values, index, chunk_max, chunk_sum, vocab, logits.stride(0),
                                      pad, K=k, STATS=stats, BLOCK=TOP_BLOCK, num_warps=8)
    if k == 1:   # the first chunk holding the row's maximum: argmax's first-index tie rule
        best = values.argmax(1, keepdim=True)
        return torch.gather(values, 1, best), torch.gather(index, 1, best)
    return (values, index, chunk_max, chunk_sum) if stats else (values, index)


if triton is not None:
    from pipeline.kernels.norm import layer_norm_row

    @triton.jit(do_not_specialize=["span"])
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, origin_ptr, lengths_ptr, span,
                                 stride_t, stride_r, stride_origin, scale,
                                 HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                 GROUP: tl.constexpr, USE_ORIGIN: tl.constexpr, USE_LENGTHS: tl.constexpr,
                                 BLOCK_N: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        valid_d = d < HEAD_DIM
        q_offset = row * HEADS * HEAD_DIM + head * HEAD_DIM
        q = tl.load(q_ptr + q_offset + d, mask=valid_d, other=0.0).to(tl.float32) * scale
        key_row = row // GROUP
        end = span
        if USE_LENGTHS:
            end = tl.minimum(span, tl.load(lengths_ptr + key_row).to(tl.int32))
        m_i = tl.full([], float("-inf"), tl.float32)
        l_i = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for n0 in tl.range(0, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            valid_n = n < end
            if USE_ORIGIN:   # beam search: each position from the row it was written by
                source = tl.load(origin_ptr + n * stride_origin + row, mask=valid_n, other=0).to(tl.int64)
            else:
                source = tl.zeros([BLOCK_N], dtype=tl.int64) + key_row
            offs = n[:, None].to(tl.int64) * stride_t + source[:, None] * stride_r + head * HEAD_DIM + d[None, :]
            both = valid_n[:, None] & valid_d[None, :]
            k = tl.load(k_ptr + offs, mask=both, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=both, other=0.0).to(tl.float32)
            scores = tl.where(valid_n, tl.sum(k * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        tl.store(o_ptr + q_offset + d, (acc / l_i).to(o_ptr.dtype.element_ty), mask=valid_d)

    @triton.jit
    def _add_layer_norm_kernel(x_ptr, y_ptr, w_ptr, b_ptr, out_ptr, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        valid = cols < N
        # The sum rounded to the tensors' dtype first, as torch's x + y then layer_norm would.
        h = (tl.load(x_ptr + row * N + cols, mask=valid, other=0.0)
             + tl.load(y_ptr + row * N + cols, mask=valid, other=0.0)).to(tl.float32)
        out = layer_norm_row(h, valid, cols, N, w_ptr, b_ptr, eps)
        tl.store(out_ptr + row * N + cols, out.to(out_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _chunk_top_kernel(x_ptr, val_ptr, idx_ptr, max_ptr, sum_ptr, vocab, stride, pad,
                          K: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        chunks = tl.num_programs(1)
        local = tl.arange(0, BLOCK)
        cols = chunk * BLOCK + local
        x = tl.load(x_ptr + row.to(tl.int64) * stride + cols, mask=cols < vocab,
                    other=float("-inf")).to(tl.float32)
        if STATS:
            top = tl.max(x, axis=0)
            tl.store(max_ptr + row * chunks + chunk, top)
            tl.store(sum_ptr + row * chunks + chunk, tl.sum(tl.exp(x - top), axis=0))
        x = tl.where(cols == pad, float("-inf"), x)
        out = (row * chunks + chunk) * K
        for j in tl.static_range(K):   # K rounds of argmax, each taking its winner out
            value, at = tl.max(x, axis=0, return_indices=True)
            tl.store(val_ptr + out + j, value)
            tl.store(idx_ptr + out + j, (chunk * BLOCK + at).to(tl.int64))
            x = tl.where(local == at, float("-inf"), x)
