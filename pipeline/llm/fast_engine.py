"""FastPhiEngine: phi-2 generation with a static KV cache and one CUDA graph per batch size.

The engine contract is `engine.py`'s. What makes it fast:
- the cache is allocated once and reused, so a decode step allocates nothing and has fixed addresses;
- the decode step (phi_model.decode_step) is captured as a CUDA graph per batch-size bucket, when
  a call first needs that bucket, and replayed for every token: one launch instead of ~300 kernels;
- the host looks at the generated tokens only every `check_every` steps, in one copy, and the copy is
  read one round late so the GPU never waits for the host (end-of-text and stop sequences may thus
  run a few tokens past their end: `finish_row` cuts them, the answer stage trims the text).

Without graphs (use_graphs=False) the same code runs op by op, also on the CPU, which is how CI
checks it against transformers.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from pipeline.errors import InputTooLongError, ModelLoadError
from pipeline.gpu_gate import GATE
from pipeline.kernels.phi_attention import AttentionConfig, triton
from pipeline.llm.decode_config import DEFAULT_DECODE, DecodeConfig
from pipeline.llm.engine import (Generated, GenerationSettings, StopCheck, finish_row, generate_shrinking,
                                 non_finite_error, shifted)
from pipeline.llm.memory import CACHE_FIT_SHARE, rows_that_fit, usable_memory
from pipeline.llm.phi_model import DecodeState, decode_step, prefill, unsupported_config
from pipeline.llm.phi_weights import phi_weights, rope_tables

CACHE_COLUMNS_STEP = 64  # cache length is rounded up to a multiple of this many columns
PREFILL_TOKENS = 16384  # prompts are prefilled in row groups of at most this many (padded) tokens
CACHE_MEMORY_SHARE = 0.3  # share of free GPU memory a cache may take to keep rows it no longer needs


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


class FastPhiEngine:
    """Greedy or seeded top-p generation for phi-2-family models; see the module docstring."""

    name = "fast"

    @staticmethod
    def unsupported_reason(model, device, *, use_graphs: bool | None = None) -> str | None:
        """None when this engine can serve `model` on `device`, else why not (one line)."""
        config = getattr(model, "config", None) if hasattr(model, "lm_head") else None  # None: no causal LM
        reason = unsupported_config(config, type(model).__name__)
        if reason is not None:
            return reason
        device = torch.device(device)
        if _model_device(model).type != device.type:
            return f"the model's weights are on {_model_device(model)}, not {device}"
        if device.type == "cuda" or (device.type == "cpu" and use_graphs is False):
            return None
        return f"the fast engine needs a CUDA device, not {device.type}"

    def __init__(self, model, eos_token_id: int, *, max_batch_size: int = 128, max_seq_len: int = 2048,
                 use_graphs: bool | None = None, use_triton: bool | None = None, check_every: int = 16,
                 config: DecodeConfig = DEFAULT_DECODE):
        self.device = _model_device(model)
        self.config = config
        cuda = self.device.type == "cuda"
        self.use_graphs = cuda if use_graphs is None else use_graphs
        reason = self.unsupported_reason(model, self.device, use_graphs=self.use_graphs)
        if reason is not None:
            raise ModelLoadError(reason)
        self.use_triton = (cuda and triton is not None) if use_triton is None else use_triton
        self.eos_token_id = eos_token_id
        self.max_batch_size = max_batch_size
        self.max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
        self.check_every = check_every
        self.weights = phi_weights(model)
        self.cos, self.sin = rope_tables(self.weights, self.max_seq_len)
        self._k_cache: torch.Tensor | None = None
        self._v_cache: torch.Tensor | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # The decode step's inputs, shared by every batch size's graph (each reads the first rows).
        long = dict(dtype=torch.long, device=self.device)
        self._tokens = torch.zeros(max_batch_size, **long)
        self._positions = torch.zeros(max_batch_size, **long)
        self._starts = torch.zeros(max_batch_size, **long)
        self._col = torch.zeros(max_batch_size, **long)  # each row's column (generate: all the same)
        # What a step adds to each row's column and position: 1, or 0 for a free slot of the
        # continuous batch (fast_batch.py), which then stays at its column 0.
        self._advance = torch.ones(max_batch_size, **long)
        # Per row, the sum of the chosen tokens' logits: NaN or inf once any of them was (checked on the
        # host with each chunk of tokens, no extra sync).
        self._check = torch.zeros(max_batch_size, dtype=torch.float32, device=self.device)
        # Per row, the LoRA adapter it applies (0: the base); read only once an adapter is loaded.
        self._adapter_rows = torch.zeros(max_batch_size, **long)
        self._adapters: list = []  # multi_lora.AdapterFactors, index + 1 in _adapter_rows
        self._busy = False

    # ---- public API ------------------------------------------------------------------------------

    def warmup(self, batch_sizes=(1,), seq_len: int | None = None) -> float:
        """Allocate the cache and capture the decode graphs for these batch sizes; seconds spent."""
        began = time.perf_counter()
        rows = max(self._bucket(b) for b in batch_sizes)
        self._ensure_cache(rows, seq_len or CACHE_COLUMNS_STEP)
        probe = [[self.eos_token_id] * 8]
        self.generate(probe, GenerationSettings(max_new_tokens=2))  # prefill kernels, cuBLAS handles
        if self.use_graphs:
            for size in sorted({self._bucket(b) for b in batch_sizes}):
                self._graph_for(size)
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - began

    def add_adapter(self, adapter, model) -> int:
        """Load the LoRA adapter `adapter` (an AdapterSource of `model`, this engine's model) to be
        applied unmerged by the rows that ask for it; returns its index for `generate(adapters=...)`.
        Its factors join the stacked ones (multi_lora.py), so the graphs are captured again."""
        from pipeline.llm.multi_lora import MultiLora, read_factors

        self._adapters.append(read_factors(model, adapter))
        w = self.weights
        self.weights.lora = MultiLora(self._adapters, len(w.layers), w.layers[0].hidden,
                                      w.layers[0].fc1_w.shape[0], w.dtype, self.device)
        self._graphs.clear()
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        return len(self._adapters)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], settings: GenerationSettings,
                 stop_check: StopCheck | None = None, adapters: list[int] | None = None) -> list[Generated]:
        """`adapters[i]`: the LoRA adapter prompt i applies (add_adapter's index; 0 or None: the base)."""
        def run(group: list[list[int]], first: int) -> list[Generated]:
            rows: list[list[int]] = [[] for _ in group]
            check = shifted(stop_check, first)  # rows are numbered in the whole call, as the check knows them
            chosen = None if adapters is None else adapters[first:first + len(group)]
            for new in self._run(group, settings, check, self.check_every, chosen):
                for row, tokens in zip(rows, new):
                    row.extend(tokens)
            return [finish_row(row, self.eos_token_id, settings.max_new_tokens, check, index)
                    for index, row in enumerate(rows)]

        if not prompts:
            return []
        columns = max(len(p) for p in prompts) + settings.max_new_tokens
        return generate_shrinking(prompts, run, self._rows_for(len(prompts), columns), self._release)

    def stream(self, prompt: list[int], settings: GenerationSettings,
               stop_check: StopCheck | None = None, adapter: int = 0) -> Iterator[int]:
        """Yield generated ids as they come; ends at end-of-text, a stop sequence or the length.

        Tokens reach the host one step late (the GPU runs the next step meanwhile). The stop check
        runs on each token here: they are on the host anyway, so it costs no extra sync.
        """
        with torch.inference_mode():
            for new in self._run([prompt], settings, stop_check, 1, [adapter]):
                for token in new[0]:
                    if token == self.eos_token_id:
                        return
                    yield token

    def decode_batch(self, max_rows: int = 64):
        """Continuous batching on this engine's cache and graphs (llm/fast_batch.py)."""
        from pipeline.llm.fast_batch import FastDecodeBatch

        return FastDecodeBatch(self, max_rows)

    # ---- the generation loop -------------------------------------------------------------------

    def _run(self, prompts: list[list[int]], settings: GenerationSettings, stop_check: StopCheck | None,
             every: int, adapters: list[int] | None = None) -> Iterator[list[list[int]]]:
        """Generate for up to max_batch_size prompts; yield each row's new ids in chunks of `every`.

        A row's ids stop growing once it wrote end-of-text or stop_check found a stop sequence; the
        loop ends once every row has.
        """
        if self._busy:
            raise RuntimeError("FastPhiEngine serves one generate/stream call at a time")
        self._busy = True
        try:
            yield from self._loop(prompts, settings, stop_check, every, adapters)
        finally:
            self._busy = False

    def _loop(self, prompts, settings, stop_check, every, adapters=None):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        count, width = len(prompts), max(len(p) for p in prompts)
        if width >= self.max_seq_len:
            raise InputTooLongError(
                f"the prompt has {width} tokens; the answer model reads at most {self.max_seq_len - 1}")
        steps = min(settings.max_new_tokens, self.max_seq_len - width)
        if steps <= 0:
            return
        rows = self._bucket(count) if self.use_graphs else count
        self._ensure_cache(rows, width + steps)
        graph = self._graph_for(rows) if self.use_graphs else None
        state = self._state(rows)
        self._adapter_rows.zero_()
        if adapters is not None:
            self._adapter_rows[:count] = torch.tensor(adapters, dtype=torch.long)
        generator = None
        if not settings.greedy and settings.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(settings.seed)

        check = self._check[:rows]
        check.zero_()
        starts, logits = self._prefill(prompts, width, state)
        first = self._select(logits, settings, generator, check=check[:count])
        self._load_state(state, first, starts, width, count)
        out = torch.empty((rows, steps), dtype=torch.long, device=self.device)
        finished = [False] * count
        ids: list[list[int]] = [[] for _ in range(count)]
        pending, copied = None, 0
        for step in range(steps):
            out[:, step].copy_(state.tokens)
            last = step == steps - 1
            if (step + 1) % every == 0 or last:
                fresh = self._to_host(out[:count, copied:step + 1], check[:count])
                copied = step + 1
                if pending is not None:  # read the previous chunk: it is done by now
                    yield self._take(pending, ids, finished, stop_check)
                    if all(finished):
                        return
                pending = fresh
            if last:
                break
            if graph is not None:
                graph[0].replay()
                logits = graph[1]
            else:
                logits = self._step(state, rows, kv_len=width + step + 1)
            self._select(logits, settings, generator, out=state.tokens, check=check)
        if pending is not None:
            yield self._take(pending, ids, finished, stop_check)

    def _take(self, pending, ids: list[list[int]], finished: list[bool],
              stop_check: StopCheck | None) -> list[list[int]]:
        """Wait for a chunk's copy, append it to the unfinished rows, mark rows that ended."""
        host, host_check, event = pending
        if event is not None:
            event.synchronize()
        if not bool(torch.isfinite(host_check).all()):
            raise non_finite_error(self.weights.dtype)
        new = []
        for row, tokens in enumerate(host.tolist()):
            if finished[row]:
                new.append([])
                continue
            ids[row].extend(tokens)
            new.append(tokens)
            if self.eos_token_id in tokens or (stop_check is not None and stop_check(row, ids[row])):
                finished[row] = True
        return new

    def _to_host(self, tokens: torch.Tensor, check: torch.Tensor):
        if tokens.device.type != "cuda":
            return tokens.clone(), check.clone(), None
        host, host_check = (torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                            for t in (tokens, check))
        event = torch.cuda.Event()
        event.record()
        return host, host_check, event

    def _step(self, state: DecodeState, rows: int, kv_len: int | None = None) -> torch.Tensor:
        """One decode step, then move each row to its next column (inside the graph when captured).

        The clamps keep a row that stepped past its end (the continuous batch learns of an end one
        step late) inside the cache and the rotary tables; such a row's tokens are discarded."""
        logits = decode_step(self.weights, state, self.cos, self.sin, use_triton=self.use_triton,
                             kv_len=kv_len, attention=self._attention(rows), config=self.config)
        advance = self._advance[:rows]
        state.col.add_(advance).clamp_(max=state.k_cache.shape[3] - 1)
        state.positions.add_(advance).clamp_(max=self.max_seq_len - 1)
        return logits

    @staticmethod
    def _select(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None,
                out: torch.Tensor | None = None, check: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy argmax, or temperature + top-p sampling (exponential race: no host sync); the chosen
        tokens' logits are added to `check` (NaN or inf stays there)."""
        if settings.greedy:
            values, chosen = torch.max(logits, -1) if out is None else torch.max(logits, -1, out=(
                torch.empty(logits.shape[:1], dtype=logits.dtype, device=logits.device), out))
            if check is not None:
                check.add_(values)
            return chosen
        scores = logits.float() / settings.temperature
        if settings.top_p < 1.0:
            ordered, order = scores.sort(-1, descending=True)
            probs = ordered.softmax(-1)
            drop = probs.cumsum(-1) - probs > settings.top_p  # keep the fewest reaching top_p
            scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        probs = scores.softmax(-1)
        race = torch.empty_like(probs).exponential_(1.0, generator=generator)
        chosen = (probs / race).argmax(-1)
        if check is not None:
            check.add_(logits.gather(-1, chosen[:, None])[:, 0])
        return chosen if out is None else out.copy_(chosen)

    # ---- prefill and state -----------------------------------------------------------------------

    def _prefill(self, prompts: list[list[int]], width: int,
                 state: DecodeState) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad, fill the cache for every prompt row; return each row's start and last logits."""
        ids = torch.full((len(prompts), width), self.eos_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
        ids = ids.to(self.device)
        starts = torch.tensor([width - len(p) for p in prompts], dtype=torch.long, device=self.device)
        group = max(1, PREFILL_TOKENS // width)
        logits = []
        for first in range(0, len(prompts), group):
            rows = slice(first, min(first + group, len(prompts)))
            logits.append(prefill(self.weights, ids[rows], starts[rows], state.k_cache[:, rows],
                                  state.v_cache[:, rows], self.cos, self.sin, self.use_triton, self.config,
                                  self._adapter_rows[rows]))
        return starts, torch.cat(logits)

    def _load_state(self, state: DecodeState, first: torch.Tensor, starts: torch.Tensor, width: int,
                    count: int) -> None:
        """Feed each row its first token; rows past `count` (graph padding) attend only to themselves."""
        state.tokens.fill_(self.eos_token_id)
        state.tokens[:count].copy_(first)
        state.starts.fill_(width)
        state.starts[:count].copy_(starts)
        state.positions.fill_(0)
        state.positions[:count].copy_(width - starts)
        state.col.fill_(width)
        self._advance.fill_(1)

    def _state(self, rows: int) -> DecodeState:
        return DecodeState(self._tokens[:rows], self._positions[:rows], self._col[:rows], self._starts[:rows],
                           self._k_cache[:, :rows], self._v_cache[:, :rows], self._adapter_rows[:rows])

    # ---- cache and graphs ------------------------------------------------------------------------

    def _bucket(self, count: int) -> int:
        """Graphs exist per power-of-two batch size; a batch runs in the smallest that holds it."""
        if count > self.max_batch_size:
            raise ValueError(f"batch of {count} exceeds max_batch_size {self.max_batch_size}")
        size = 1
        while size < count:
            size *= 2
        return min(size, self.max_batch_size)

    def _attention(self, rows: int) -> AttentionConfig:
        return self.config.attention(rows)

    def _cache_budget(self, share: float = CACHE_MEMORY_SHARE) -> float:
        """Bytes the cache may take: a share of what this process can still allocate (with the cache)."""
        if self.device.type != "cuda":
            return 0.0
        held = 0 if self._k_cache is None else 2 * self._k_cache.nbytes
        return (usable_memory(self.device) + held) * share

    def _rows_for(self, count: int, columns: int) -> int:
        """Rows per group for `count` prompts needing `columns` cache columns: what fits the card."""
        w = self.weights
        columns = min(-(-columns // CACHE_COLUMNS_STEP) * CACHE_COLUMNS_STEP, self.max_seq_len)
        per_row = 2 * len(w.layers) * w.heads * w.head_dim * w.embed.element_size() * columns
        budget = self._cache_budget(CACHE_FIT_SHARE) if self.device.type == "cuda" else float("inf")
        return rows_that_fit(min(count, self.max_batch_size), per_row, budget)

    def _release(self) -> None:
        """Drop the cache and the graphs (after running out of memory; the next call reallocates)."""
        self._graphs.clear()
        self._k_cache = self._v_cache = None
        if self.device.type == "cuda":
            self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
            torch.cuda.empty_cache()

    def _cache_shape(self, rows: int, needed: int) -> tuple[int, int]:
        """(rows, columns) to allocate.

        Columns: what is asked, rounded up, and no more: attention reads a cache slower the more
        columns it has beyond those in use (the stride between a row's heads grows; figures in
        docs/benchmarks.md). When a cache grows, it
        grows to at least 1.5x its columns, so a run of ever longer prompts reallocates it (and
        recaptures its graphs) a few times, not at every call. Rows: those held now are kept
        where the budget allows, so a smaller batch after a larger one reuses the cache.
        """
        w, step = self.weights, CACHE_COLUMNS_STEP
        per_cell = 2 * len(w.layers) * w.heads * w.head_dim * w.embed.element_size()  # one row, one column
        held_rows, held_columns = (0, 0) if self._k_cache is None else (self._k_cache.shape[1],
                                                                           self._k_cache.shape[3])
        if needed > held_columns > 0:
            needed = max(needed, held_columns * 3 // 2)
        columns = min(-(-max(needed, held_columns) // step) * step, self.max_seq_len)
        if held_rows > rows and held_rows * columns * per_cell <= self._cache_budget():
            rows = held_rows
        return rows, columns

    def _ensure_cache(self, rows: int, needed: int) -> None:
        if self._k_cache is not None and self._k_cache.shape[1] >= rows and self._k_cache.shape[3] >= needed:
            return
        # The graphs hold the old cache's address; their memory pool goes with them (a pool whose
        # graphs are all gone cannot take a new capture), so a new pool is made too.
        rows, columns = self._cache_shape(rows, needed)
        self._graphs.clear()
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._k_cache = self._v_cache = None
        w = self.weights
        shape = (len(w.layers), rows, w.heads, columns, w.head_dim)
        # zeros, not empty: masked-out columns still enter the torch path's products, and 0 * NaN = NaN
        self._k_cache = torch.zeros(shape, dtype=w.dtype, device=self.device)
        self._v_cache = torch.zeros(shape, dtype=w.dtype, device=self.device)

    def _graph_for(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture (once per batch bucket and cache) the decode step; returns it and its logits."""
        if rows in self._graphs:
            return self._graphs[rows]
        with GATE.capture():  # no other thread's GPU work (a server's translators) meanwhile
            return self._capture_graph(rows)

    def _capture_graph(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        state = self._state(rows)
        for buffer in (self._col, self._positions, self._starts):  # in-range values for the warm-up
            buffer.zero_()

        def step() -> torch.Tensor:
            return self._step(state, rows)

        # Warm-up runs (Triton compilation, cuBLAS workspaces) on a side stream, as capture needs.
        # They write one cache column that the next prefill or decode step overwrites before use.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = step()
        self._graphs[rows] = (graph, logits)
        return graph, logits
