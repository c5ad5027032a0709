"""Continuous batching on FastPhiEngine's static cache and CUDA graphs (the DecodeBatch contract of
continuous.py): a question that reaches the server joins the rows being decoded at the next step.

Each row of the engine's cache is a slot of its own length, as llama.cpp's server slots are: a step
writes row b's token at its own column col[b] and attends over start[b]..col[b] (the attention kernel
reads only those columns, whatever the others hold). So a long answer never pins a short one, a row
frees its slot the moment it leaves, and the captured graph of a batch bucket serves any mix of
lengths (it reads the columns from a tensor, as gpt-fast's decode step does). Slots rather than
vLLM's paged blocks: phi-2's context is 2,048 tokens and a server runs 64 rows, so a full-context
slot per row fits an H100/H200 beside the models (40 GiB in float16), and the kernels, prefill and
graphs stay those `generate` uses, with no block table to read per tile.

`SlotCache` owns the room: which slots are free and how many columns they have. Admission asks it
(`room()`, `limit`): a request waits while no slot is free and is refused only when prompt + answer
exceed the model's context. The cache starts with the columns short answers need and widens, in
steps of FIRST_COLUMNS up to the context, when a longer request joins (attention reads a cache slower
the wider it is, even columns it skips: the stride between a row's heads grows); its rows are what
fits the memory left after the models at full width.

Prompts that arrive together are prefilled together (left-padded, as `generate` does; each row's
start is its first real column), each row applying its own LoRA adapter (multi_lora.py; 0: the
base), whose index `_join` writes beside the row's other step inputs. A step runs the graph of the
smallest bucket holding the highest live slot, feeds greedy rows their argmax on the device, and
hands the host its tokens one step late: the GPU computes the next step while the server delivers
this one's tokens.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from pipeline.errors import InputTooLongError
from pipeline.llm.continuous import select_token
from pipeline.llm.engine import GenerationSettings, non_finite_error
from pipeline.llm.memory import CACHE_FIT_SHARE, rows_that_fit
from pipeline.llm.phi_model import prefill

FIRST_COLUMNS = 512  # columns the cache starts with (a short prompt and a few hundred answer tokens)
# Padded tokens per prefill group (its keys and values pass through a scratch cache). Every group
# stalls the rows decoding and the callers after it, so it is as small as keeps the prefill's
# throughput: on an H200 (benchmarks/ttft_study.py, 64 clients, ~900-token prompts) 4,096 gave the
# tokens/s of 8,192 (-1.4%) at half the later arrivals' time to first token; 2,048 lost 10%.
PREFILL_TOKENS = 4096
GROWTH_PEAK = 1.5  # while the cache doubles to its full width, old and new exist at once


class SlotCache:
    """The slots of the engine's cache: which are free, and the columns every slot has now and may reach."""

    def __init__(self, rows: int, columns: int, limit: int):
        self.rows = rows
        self.columns = columns  # now
        self.limit = limit  # at most: the model's context
        self._free = list(range(rows))

    def room(self) -> int:
        return len(self._free)

    def take(self) -> int:
        """The lowest free slot (so a small batch runs in a small graph bucket)."""
        self._free.sort()
        return self._free.pop(0)

    def give(self, slot: int) -> None:
        self._free.append(slot)

    def reset(self) -> None:
        self._free = list(range(self.rows))

    def width_for(self, need: int) -> int:
        """Columns the cache needs for a row of `need` columns: now's, or `need` rounded up to a
        multiple of FIRST_COLUMNS (at most a few growths up to the context, each by whole steps)."""
        if need <= self.columns:
            return self.columns
        return min(-(-need // FIRST_COLUMNS) * FIRST_COLUMNS, self.limit)


@dataclass
class _Live:
    row: int  # its slot
    settings: GenerationSettings
    generator: torch.Generator | None  # for sampling
    column: int  # the column its next step writes (the host's copy of col[row])


@dataclass
class _Launched:
    """A step whose tokens are on their way to the host."""

    rows: dict[int, int]  # key -> slot, of the rows it stepped
    tokens: torch.Tensor
    values: torch.Tensor  # each row's top logit: non-finite once the model overflowed
    event: torch.cuda.Event | None
    logits: torch.Tensor  # the step's (a graph's output: valid until its next replay)


class FastDecodeBatch:
    def __init__(self, engine, max_rows: int = 64, columns: int = FIRST_COLUMNS, bucket: int | None = None):
        """bucket: run every step in the graph of this many rows (tests compare rows at one shape)."""
        self.engine = engine
        limit = engine.max_seq_len
        rows = self._rows_that_fit(min(max_rows, engine.max_batch_size), limit)
        self.max_rows = rows
        self.bucket = bucket
        self.slots = SlotCache(rows, min(columns, limit), limit)
        self.limit = limit
        self.prefill_tokens = PREFILL_TOKENS
        self.rows: dict[int, _Live] = {}  # by the key add() returned
        self._keys = itertools.count()
        self._pending: _Launched | None = None
        # two sets of pinned host buffers for the steps' tokens: one being read, one being filled
        self._host = [self._host_buffers() for _ in range(2)] if engine.device.type == "cuda" else []

    def __len__(self) -> int:
        return len(self.rows)

    def room(self) -> int:
        """Rows that can join now."""
        return self.slots.room()

    def check(self, prompt: list[int], settings: GenerationSettings) -> None:
        """Raise for a request that can never fit a slot (prompt + answer past the model's context)."""
        if not prompt:
            raise ValueError("every prompt needs at least one token")
        if len(prompt) + settings.max_new_tokens > self.limit:
            raise InputTooLongError(
                f"the prompt has {len(prompt)} tokens and the answer may take {settings.max_new_tokens};"
                f" the answer model holds at most {self.limit} tokens in all")

    @torch.inference_mode()
    def warm(self) -> None:
        """Allocate the cache and capture every bucket's graph now, not when the first request needs it."""
        self._begin()
        if self.engine.use_graphs:
            for bucket in self._buckets():
                self._graph(bucket)
        self._end()

    @torch.inference_mode()
    def add(self, requests: list[tuple]) -> list[tuple[int, int]]:
        """Prefill these (prompt, settings[, adapter]) requests (together where they fit one group) into
        free slots, each applying its LoRA adapter (0 or left out: the base); (key, first token) each."""
        requests = [(*request, 0)[:3] for request in requests]
        for prompt, settings, _ in requests:
            self.check(prompt, settings)
        if len(requests) > self.room():
            raise RuntimeError(f"the decode batch has room for {self.room()} more rows, not {len(requests)}")
        if not self.rows:
            self._begin()
        out: list[tuple[int, int] | None] = [None] * len(requests)
        try:
            for group in self._groups(requests):
                for index, key_first in zip(group, self._add_group([requests[i] for i in group])):
                    out[index] = key_first
        except BaseException:  # none of these rows joins: their slots are free again
            for key_first in out:
                if key_first is not None:
                    self.drop(key_first[0])
            if not self.rows:
                self._end()
            raise
        return out

    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        """One decode step for every live row; returns {key: token} of the step the host has now.

        With only greedy rows the tokens are those of the step before (this one runs meanwhile);
        with a sampling row the step waits for its own tokens. A row dropped meanwhile gets none.
        """
        sampling = any(not live.settings.greedy for live in self.rows.values())
        if self._pending is not None and (sampling or not self.rows):
            return self._read(self._take_pending())
        if not self.rows:
            return {}
        launched = self._launch()
        if sampling:
            return self._read(launched, sample=True)
        previous, self._pending = self._pending, launched
        return self._read(previous) if previous is not None else {}

    def drop(self, key: int) -> None:
        live = self.rows.pop(key, None)
        if live is None:
            return
        engine, row = self.engine, live.row
        # From the next step the slot stays at its column 0 and attends only to it.
        engine._advance[row] = 0
        engine._col[row] = 0
        engine._starts[row] = 0
        engine._positions[row] = 0
        engine._adapter_rows[row] = 0
        self.slots.give(row)
        if not self.rows:
            self._end()

    # ---- joining -----------------------------------------------------------------------------------

    def _groups(self, requests) -> list[list[int]]:
        """Request indices in prefill groups: by length, each group's padded width fitting every row."""
        order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
        groups: list[list[int]] = []
        for index in order:
            length = len(requests[index][0])
            group = groups[-1] if groups else None
            if group is not None:
                # sorted: this prompt is the group's longest, so its length is the group's width
                fits = all(length + requests[i][1].max_new_tokens <= self.limit for i in group)
                if fits and length * (len(group) + 1) <= self.prefill_tokens:
                    group.append(index)
                    continue
            groups.append([index])
        return groups

    def _add_group(self, group) -> list[tuple[int, int]]:
        prompts, adapters = [prompt for prompt, _, _ in group], [adapter for _, _, adapter in group]
        width = max(len(prompt) for prompt in prompts)
        need = max(width + settings.max_new_tokens for _, settings, _ in group)
        if need > self.slots.columns:
            self._grow(self.slots.width_for(need))
        slots = [self.slots.take() for _ in group]
        try:
            logits = self._prefill(prompts, width, slots, adapters)
            firsts, generators = self._first_tokens(group, logits)
        except BaseException:
            for slot in slots:
                self.slots.give(slot)
            raise
        out = []
        for slot, (_, settings, _), generator, first in zip(slots, group, generators, firsts):
            key = next(self._keys)
            self.rows[key] = _Live(slot, settings, generator, width)
            out.append((key, first))
        self._join(slots, firsts, [width - len(prompt) for prompt in prompts], width, adapters)
        return out

    def _first_tokens(self, group, logits: torch.Tensor) -> tuple[list[int], list]:
        """Each prefilled row's first token (greedy, or sampled with its own generator) and generator."""
        firsts, generators = [], []
        for index, (_, settings, _) in enumerate(group):
            generator = None
            if not settings.greedy:
                generator = torch.Generator(device="cpu").manual_seed(
                    settings.seed if settings.seed is not None else int(torch.randint(0, 2**31, ())))
            generators.append(generator)
            firsts.append(None if settings.greedy else self._choose(logits[index], settings, generator))
        values, greedy = torch.max(logits, -1)
        values, greedy = values.tolist(), greedy.tolist()  # the join's one wait for the GPU
        if not all(math.isfinite(value) for value in values):
            raise non_finite_error(self.engine.weights.dtype)
        return [g if f is None else f for g, f in zip(greedy, firsts)], generators

    def _join(self, slots: list[int], firsts: list[int], starts: list[int], width: int,
              adapters: list[int]) -> None:
        """Each new row's step inputs, one write per tensor for the group (the LoRA adapter each row
        applies among them: multi_lora.py)."""
        engine = self.engine
        index = torch.tensor(slots, dtype=torch.long, device=engine.device)
        start = torch.tensor(starts, dtype=torch.long, device=engine.device)
        engine._tokens[index] = torch.tensor(firsts, dtype=torch.long, device=engine.device)
        engine._starts[index] = start
        engine._col[index] = width
        engine._positions[index] = width - start
        engine._advance[index] = 1
        engine._adapter_rows[index] = torch.tensor(adapters, dtype=torch.long, device=engine.device)

    def _prefill(self, prompts: list[list[int]], width: int, slots: list[int], adapters: list[int]) -> torch.Tensor:
        """The prompts' keys and values into their slots' columns 0..width-1 (left-padded), prompt i
        applying LoRA adapter adapters[i]; last logits."""
        engine, w = self.engine, self.engine.weights
        shape = (len(w.layers), len(prompts), w.heads, width, w.head_dim)
        keys = torch.zeros(shape, dtype=w.dtype, device=engine.device)
        values = torch.zeros_like(keys)
        ids = torch.full((len(prompts), width), engine.eos_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
        ids = ids.to(engine.device)
        starts = torch.tensor([width - len(p) for p in prompts], dtype=torch.long, device=engine.device)
        rows_adapters = torch.tensor(adapters, dtype=torch.long, device=engine.device)
        logits = prefill(w, ids, starts, keys, values, engine.cos, engine.sin, engine.use_triton, engine.config,
                         rows_adapters)
        index = torch.tensor(slots, dtype=torch.long, device=engine.device)
        engine._k_cache[:, :, :, :width].index_copy_(1, index, keys)
        engine._v_cache[:, :, :, :width].index_copy_(1, index, values)
        return logits

    # ---- stepping ----------------------------------------------------------------------------------

    def _launch(self) -> _Launched:
        engine = self.engine
        bucket = self.bucket or engine._bucket(max(live.row for live in self.rows.values()) + 1)
        if engine.use_graphs:
            graph, logits = self._graph(bucket)
            graph.replay()
        else:
            kv_len = min(max(live.column for live in self.rows.values()) + 1, self.slots.columns)
            logits = engine._step(engine._state(bucket), bucket, kv_len=kv_len)
        values, tokens = torch.max(logits, -1)
        engine._tokens[:bucket].copy_(tokens)  # greedy rows feed themselves; sampling rows are overwritten
        rows = {}
        for key, live in self.rows.items():
            rows[key] = live.row
            live.column = min(live.column + 1, self.slots.columns - 1)
        event = None
        if self._host:
            self._host.reverse()  # the other set: the pending step may still be read from this one
            host = [buffer[:bucket].copy_(t, non_blocking=True) for buffer, t in zip(self._host[0], (tokens, values))]
            event = torch.cuda.Event()
            event.record()
            tokens, values = host
        return _Launched(rows, tokens, values, event, logits)

    def _host_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.engine.max_batch_size
        return (torch.empty(size, dtype=torch.long, pin_memory=True),
                torch.empty(size, dtype=self.engine.weights.dtype, pin_memory=True))

    def _take_pending(self) -> _Launched:
        launched, self._pending = self._pending, None
        return launched

    def _read(self, launched: _Launched, sample: bool = False) -> dict[int, int]:
        if launched.event is not None:
            launched.event.synchronize()
        tokens, values = launched.tokens.tolist(), launched.values.tolist()
        chosen = {}
        for key, row in launched.rows.items():
            live = self.rows.get(key)
            if live is None:  # dropped since: its token is nobody's
                continue
            if not math.isfinite(values[row]):
                raise non_finite_error(self.engine.weights.dtype)
            chosen[key] = tokens[row]
            if sample and not live.settings.greedy:
                chosen[key] = self._choose(launched.logits[row], live.settings, live.generator)
                self.engine._tokens[row] = chosen[key]
        return chosen

    def _graph(self, bucket: int):
        """The engine's captured step for `bucket` rows. Capturing resets the step's inputs and writes
        cache columns 0 and 1 of every row (its warm-up runs): live rows get them back."""
        engine = self.engine
        if bucket not in engine._graphs:
            inputs = (engine._col, engine._positions, engine._starts, engine._tokens, engine._advance)
            saved = [tensor.clone() for tensor in inputs]
            columns = [cache[:, :, :, :2].clone() for cache in (engine._k_cache, engine._v_cache)]
            engine._graph_for(bucket)
            for tensor, value in zip(inputs, saved):
                tensor.copy_(value)
            for cache, value in zip((engine._k_cache, engine._v_cache), columns):
                cache[:, :, :, :2] = value
        return engine._graphs[bucket]

    def _buckets(self) -> list[int]:
        if self.bucket:
            return [self.bucket]
        return sorted({self.engine._bucket(rows) for rows in range(1, self.max_rows + 1)})

    # ---- the cache ---------------------------------------------------------------------------------

    def _rows_that_fit(self, wanted: int, limit: int) -> int:
        """Slots whose full-context cache fits the memory left after the models (growth's peak included)."""
        engine, w = self.engine, self.engine.weights
        per_row = 2 * len(w.layers) * w.heads * w.head_dim * w.embed.element_size() * limit * GROWTH_PEAK
        budget = engine._cache_budget(CACHE_FIT_SHARE) if engine.device.type == "cuda" else float("inf")
        return rows_that_fit(wanted, int(per_row), budget)

    def _begin(self) -> None:
        """Take the engine (and its cache) for the batch: the first row joins an empty batch."""
        engine = self.engine
        if engine._busy:
            raise RuntimeError("FastPhiEngine serves one generate/stream call or decode batch at a time")
        engine._busy = True
        rows = self.bucket or engine._bucket(self.max_rows)
        engine._ensure_cache(rows, self.slots.columns)  # generate may have reshaped it meanwhile
        self.slots.columns = min(engine._k_cache.shape[3], self.limit)
        self.slots.reset()
        for tensor in (engine._col, engine._starts, engine._positions, engine._advance, engine._adapter_rows):
            tensor.zero_()
        engine._tokens.fill_(engine.eos_token_id)
        self._pending = None

    def _end(self) -> None:
        self.engine._busy = False
        self._pending = None

    def _grow(self, columns: int) -> None:
        """Widen every slot to `columns` (a longer request joins); live rows keep their columns. The
        graphs hold the old cache's address: every bucket's graph is captured again here."""
        engine = self.engine
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)  # no step of the old graphs may still be running
        old = (engine._k_cache, engine._v_cache)
        shape = list(old[0].shape)
        shape[3] = columns
        grown = []
        for cache in old:
            new = torch.zeros(shape, dtype=cache.dtype, device=cache.device)
            new[:, :, :, :cache.shape[3]] = cache
            grown.append(new)
        engine._graphs.clear()
        engine._pool = torch.cuda.graph_pool_handle() if engine.use_graphs else None
        engine._k_cache, engine._v_cache = grown
        del old
        self.slots.columns = columns
        if engine.use_graphs:  # now, once, rather than whenever a bucket is next met under load
            for bucket in self._buckets():
                self._graph(bucket)

    @staticmethod
    def _choose(logits: torch.Tensor, settings: GenerationSettings, generator) -> int:
        value = logits.float().max()
        if not bool(torch.isfinite(value)):
            raise non_finite_error(logits.dtype)
        return select_token(logits, settings, generator)
