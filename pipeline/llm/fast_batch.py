"""Continuous batching on FastPhiEngine's paged answer cache (the DecodeBatch contract of
continuous.py): a question that reaches the server joins the rows being decoded at the next step, and
`generate` and `stream` run on the same loop.

Each row is a slot of the step's tensors with its own length: a step writes row b's token at its
column col[b] and attends over columns 0..col[b], all through its block table (answer_cache.py), so
a long answer never pins a short one and a row frees its blocks the moment it leaves. A row holds the
blocks its tokens fill, not a slot sized for the whole context, so as many rows run as their tokens
fit the card (vLLM's paged attention). The captured graph of a batch bucket serves any mix of lengths.

Joining rows are prefilled together (left-padded; each layer's keys go from a one-layer scratch into
the rows' blocks), each applying its own LoRA adapter (multi_lora.py; 0: the base). A step samples on
the device (sampler.py: greedy rows their argmax, the others from their own seed and step) and
hands the host its tokens one step late: the GPU computes the next step meanwhile. When a row needs
a block and none is free, the most recently joined row is preempted: its keys and values are copied
to the host and its blocks freed, and it waits, first in line, for blocks to come back; then its
keys and values return into new blocks and it goes on from where it was, drawing exactly the tokens
it would have drawn (its own seed and step), and its caller sees only a pause. A row whose logits overflow fails alone.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field

import torch

from pipeline.errors import InputTooLongError
from pipeline.llm.blocks import OutOfBlocks
from pipeline.llm.engine import left_padded, non_finite_error
from pipeline.llm.phi_model import prefill
from pipeline.llm.memory import CACHE_FIT_SHARE
from pipeline.llm.sampler import choose, sampling_rows, seed_of
from pipeline.llm.step_reader import Sent, StepReader
from pipeline.spec import GenerationSettings

# Padded tokens per prefill group. Every group stalls the rows decoding and the callers after it, so
# it is as small as keeps the prefill's throughput: on an H200 (benchmarks/ttft_study.py, 64 clients,
# ~900-token prompts) 4,096 gave the tokens/s of 8,192 (-1.4%) at half the later arrivals' time to
# first token; 2,048 lost 10%.
PREFILL_TOKENS = 4096
READ_BLOCKS_STEP = 16  # the torch path's graphs read a multiple of this many blocks per row


@dataclass
class _Row:
    slot: int
    prompt: list[int]
    settings: GenerationSettings
    adapter: int
    seed: int
    order: int  # when it joined: the latest joined is preempted first
    out: list[int] = field(default_factory=list)  # the tokens handed back so far
    column: int = 0  # the column its next step writes (the host's copy of col[slot])
    unread: int = 0  # launched steps whose token the host has not read
    saved: tuple | None = None  # a preempted row's keys and values, on the host


@dataclass
class _Launched:
    rows: dict[int, int]  # key -> slot, of the rows it stepped
    sent: Sent  # its tokens, and each row's top logit (non-finite once the model overflowed), to the host


class FastDecodeBatch:
    def __init__(self, engine, max_rows: int = 64, bucket: int | None = None, gpu_memory: float | None = None,
                 blocks: int | None = None):
        """bucket: run every step in the graph of this many rows (tests compare rows at one shape).
        gpu_memory: bytes the process may take in all (the server's --gpu-memory): the first row sizes
        the block pool from it, once; blocks: a pool of exactly this many (tests); neither: the pool
        grows to what the rows need, within a share of the free memory (generate)."""
        self.engine = engine
        self.cache = engine.cache
        self.max_rows = min(max_rows, self.cache.rows)
        self.bucket = bucket
        self.gpu_memory = gpu_memory
        self.fixed = blocks  # the pool's size where it is fixed: from gpu_memory when the first row joins
        self.limit = engine.max_seq_len
        self.prefill_tokens = PREFILL_TOKENS
        self.rows: dict[int, _Row] = {}  # by the key add() returned: live rows
        self.preempted: deque[int] = deque()  # keys of rows waiting to be prefilled again
        self.parked: dict[int, _Row] = {}  # their rows
        self.preemptions = 0
        self._free_slots = list(range(self.max_rows))
        self._keys = itertools.count()
        self._pending: _Launched | None = None
        self._reader = StepReader(self.cache.rows, engine.weights.dtype, engine.device,
                                  beside=engine.config.host_copy_beside)

    def __len__(self) -> int:
        return len(self.rows) + len(self.parked)

    # ---- admission ---------------------------------------------------------------------------------

    def room(self) -> int:
        """Rows that can join now (none while a preempted row waits to come back)."""
        return 0 if self.parked else len(self._free_slots)

    def joinable(self, lengths: list[int]) -> int:
        """How many of these prompts, in order, can join now: slots, and blocks for their prompts
        beside a block in hand for every row that will then be live (its next block)."""
        room, blocks = self.room(), self.cache.blocks
        if blocks is None or not self.rows:
            return min(len(lengths), room)  # the pool is sized (or grows) when the first row joins
        need = len(self.rows)
        for count, length in enumerate(lengths[:room]):
            need += blocks.blocks_for(length + 1) + 1
            if need > blocks.free:
                return count
        return min(len(lengths), room)

    def check(self, prompt: list[int], settings: GenerationSettings) -> None:
        """Raise for a request that can never fit (prompt + answer past the model's context or the pool)."""
        if not prompt:
            raise ValueError("every prompt needs at least one token")
        need = len(prompt) + settings.max_new_tokens
        if need > self.limit:
            raise InputTooLongError(
                f"the prompt has {len(prompt)} tokens and the answer may take {settings.max_new_tokens};"
                f" the answer model holds at most {self.limit} tokens in all")
        blocks = self.cache.blocks
        if self.fixed is not None and blocks is not None and blocks.blocks_for(need) > blocks.usable:
            raise InputTooLongError(
                f"the prompt has {len(prompt)} tokens and the answer may take {settings.max_new_tokens}; the"
                f" answer cache holds {blocks.usable * blocks.block_size} tokens in all (--gpu-memory)")

    @torch.inference_mode()
    def warm(self) -> None:
        """Size the block pool for serving and capture every bucket's graph now, not for the first caller."""
        self._begin()
        try:
            if self.engine.use_graphs:
                for bucket in self._buckets():
                    self._graph(bucket, 1)
        finally:
            self._end_if_idle()

    @torch.inference_mode()
    def add(self, requests: list[tuple]) -> list[tuple[int, int | BaseException]]:
        """Prefill these (prompt, settings[, adapter]) requests (together where they fit one group) into
        free slots; (key, first token) each, or (key, error) for a row whose logits overflowed (it did
        not join). A failure of the whole prefill leaves none of them joined and raises."""
        requests = [(*request, 0)[:3] for request in requests]
        for prompt, settings, _ in requests:
            self.check(prompt, settings)
        if len(requests) > self.room():
            raise RuntimeError(f"the decode batch has room for {self.room()} more rows, not {len(requests)}")
        if not self.rows and not self.parked:
            self._begin()
        out: list = [None] * len(requests)
        try:
            for group in self._groups([len(prompt) for prompt, _, _ in requests]):
                rows = [self._new_row(*requests[i]) for i in group]
                for index, key_first in zip(group, self._join(rows)):
                    out[index] = key_first
        except BaseException:  # none of these rows joins: their slots and blocks are free again
            for key_first in out:
                if key_first is not None:
                    self.drop(key_first[0])
            self._end_if_idle()
            raise
        return out

    def drop(self, key: int) -> None:
        """Forget a row (live or preempted): its slot and blocks are free from the next step."""
        row = self.rows.pop(key, None) or self.parked.pop(key, None)
        if row is None:
            return
        if key in self.preempted:
            self.preempted.remove(key)
        else:
            self._vacate(row)
        self._end_if_idle()

    # ---- stepping ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> dict[int, int | BaseException]:
        """One decode step for every live row; {key: token} of the step the host has now (the one
        before, while this one runs), or {key: error} for a row that failed (and was dropped)."""
        self._resume()
        if not self.rows:
            return self._read(self._take_pending()) if self._pending is not None else {}
        self._ensure_blocks()
        launched = self._launch() if self.rows else None
        previous, self._pending = self._pending, launched
        return self._read(previous) if previous is not None else {}

    def _launch(self) -> _Launched:
        cache, engine = self.cache, self.engine
        bucket = self.bucket or engine.bucket(max(row.slot for row in self.rows.values()) + 1)
        reach = max(row.column for row in self.rows.values()) + 1
        if engine.use_graphs:
            graph, logits = self._graph(bucket, reach)
            graph.replay()
        else:
            logits = engine.decode(cache.state(bucket), bucket, kv_len=reach)
        sampling = [row for row in self.rows.values() if not row.settings.greedy]
        rows = cache.sampling_rows(bucket, any(r.settings.top_p < 1 for r in sampling)) if sampling else None
        tokens, values = choose(logits, rows)
        cache.tokens[:bucket].copy_(tokens)  # each row feeds itself its token at the next step
        if sampling:
            cache.sampling.step[:bucket].add_(cache.advance[:bucket])
        stepped = {}
        for key, row in self.rows.items():
            stepped[key] = row.slot
            row.column = min(row.column + 1, self.limit - 1)  # as the step clamps col on the device
            row.unread += 1
        return _Launched(stepped, self._reader.send(tokens, values))

    def _read(self, launched: _Launched) -> dict[int, int | BaseException]:
        launched.sent.wait()
        tokens, values = launched.sent.tokens.tolist(), launched.sent.values.tolist()
        chosen: dict[int, int | BaseException] = {}
        for key, slot in launched.rows.items():
            row = self.rows.get(key) or self.parked.get(key)
            if row is None:  # dropped since: its token is nobody's
                continue
            row.unread -= 1
            if not math.isfinite(values[slot]):
                chosen[key] = non_finite_error(self.engine.weights.dtype)
                self.drop(key)
                continue
            chosen[key] = tokens[slot]
            row.out.append(tokens[slot])
        return chosen

    def _take_pending(self) -> _Launched:
        launched, self._pending = self._pending, None
        return launched

    # ---- blocks and preemption -----------------------------------------------------------------------

    def _ensure_blocks(self) -> None:
        """Every live row holds the block its next column falls in; where none is free, the latest
        joined row is preempted (possibly the one asking), oldest rows first served."""
        for key in sorted(self.rows, key=lambda k: self.rows[k].order):
            row = self.rows.get(key)
            while row is not None:
                try:
                    self._grow(row, row.column + 1)  # column < limit: within the row's table
                    break
                except OutOfBlocks:
                    victim = max(self.rows, key=lambda k: self.rows[k].order)
                    self._preempt(victim)
                    if victim == key:
                        row = None

    def _grow(self, row: _Row, columns: int) -> None:
        """Give the row the blocks it lacks for `columns` columns. Where too few are free, a batch
        without a fixed pool (generate's) first grows the pool within its budget; else OutOfBlocks."""
        blocks = self.cache.blocks
        missing = blocks.missing(row.slot, columns)
        if missing > blocks.free and self.fixed is None:
            wanted = blocks.total + missing - blocks.free
            self.reserve(wanted, at_least=0 if self.rows else wanted)  # the first row runs, budget or not
        held = len(blocks.held(row.slot))
        self.cache.place(row.slot, held, blocks.grow(row.slot, columns))

    def reserve(self, blocks: int, at_least: int = 0) -> None:
        """Grow the pool towards `blocks`, within a share of the free memory but to `at_least` in any
        case (generate's rule; a serving batch's pool is sized once, from --gpu-memory)."""
        cache = self.cache
        if cache.device.type == "cuda":
            held = 0 if cache.blocks is None else cache.blocks.total
            blocks = min(blocks, max(cache.blocks_within(cache.budget(CACHE_FIT_SHARE)), held, at_least))
        cache.reserve(blocks)

    def _preempt(self, key: int) -> None:
        """The row leaves its blocks, its keys and values copied out to the host (swapped, as vLLM's
        first scheduler did: recomputing them would round differently from the steps that made them)."""
        row = self.rows.pop(key)
        row.saved = self.cache.save(self.cache.blocks.held(row.slot))
        self._vacate(row)
        self.parked[key] = row
        self.preempted.append(key)
        self.preemptions += 1

    def _resume(self) -> None:
        """Preempted rows back, oldest first, while slots and blocks allow (once their tokens are all
        read): their keys and values into new blocks, and on from their next column and token."""
        while self.preempted:
            key = self.preempted[0]
            row = self.parked[key]
            if row.unread or not self._free_slots or not self._blocks_free_for(row.column + 1):
                return
            self.preempted.popleft()
            del self.parked[key]
            row.slot = self._take_slot()
            self._grow(row, row.column + 1)
            self.cache.restore(row.saved, self.cache.blocks.held(row.slot))
            row.saved = None
            self.cache.write_rows([row.slot], col=[row.column], positions=[row.column], advance=[1],
                                  adapters=[row.adapter])
            self._write_sampling([row], tokens=[row.out[-1]], step=[len(row.out)])
            self.rows[key] = row

    def _blocks_free_for(self, columns: int) -> bool:
        blocks = self.cache.blocks
        return blocks.blocks_for(columns) + len(self.rows) <= blocks.free or not self.rows

    def _vacate(self, row: _Row) -> None:
        self.cache.blocks.release(row.slot)
        self.cache.free_row(row.slot)
        self._free_slots.append(row.slot)

    def _take_slot(self) -> int:
        """The lowest free slot (so a small batch runs in a small graph bucket)."""
        self._free_slots.sort()
        return self._free_slots.pop(0)

    # ---- joining -----------------------------------------------------------------------------------

    def _new_row(self, prompt: list[int], settings: GenerationSettings, adapter: int) -> _Row:
        return _Row(-1, list(prompt), settings, adapter, seed_of(settings), next(self._keys))

    def _groups(self, lengths: list[int]) -> list[list[int]]:
        """Request indices in prefill groups: by length, each group's padded width within prefill_tokens."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        groups: list[list[int]] = []
        for index in order:
            if groups and lengths[index] * (len(groups[-1]) + 1) <= self.prefill_tokens:
                groups[-1].append(index)  # sorted: this prompt is the group's longest, its width
            else:
                groups.append([index])
        return groups

    def _join(self, rows: list[_Row]) -> list[tuple[int, int | BaseException]]:
        for row in rows:
            row.slot = self._take_slot()
            row.column = len(row.prompt)
        try:
            logits = self._prefill_rows(rows)
            firsts, values = self._first_tokens(rows, logits)
        except BaseException:
            for row in rows:
                self._vacate(row)
            raise
        out = []
        for row, first, value in zip(rows, firsts, values):
            if not math.isfinite(value):
                self._vacate(row)
                out.append((row.order, non_finite_error(self.engine.weights.dtype)))
                continue
            row.out.append(first)
            self.rows[row.order] = row
            out.append((row.order, first))
        self._write_sampling(rows, tokens=firsts, step=[1] * len(rows))
        return out

    def _write_sampling(self, rows: list[_Row], **values: list) -> None:
        """The rows' sampling settings into their slots, with `values` (their next token, their step)."""
        self.cache.write_rows([row.slot for row in rows], temperature=[row.settings.temperature for row in rows],
                              top_p=[row.settings.top_p for row in rows], seed=[row.seed for row in rows], **values)

    @staticmethod
    def _first_tokens(rows: list[_Row], logits: torch.Tensor) -> tuple[list[int], list[float]]:
        """Each prefilled row's first token from the sampler (its step 0); the join's one wait."""
        tokens, values = choose(logits, sampling_rows([row.settings for row in rows], [row.seed for row in rows],
                                                      [0] * len(rows), logits.device))
        return tokens.tolist(), values.float().tolist()

    def _prefill_rows(self, rows: list[_Row]) -> torch.Tensor:
        """Blocks for the prompts' columns (and the next), then their keys and values into them, each
        row applying its LoRA adapter; the last logits. Raises OutOfBlocks before any work (the
        caller gives back what the rows took)."""
        engine, cache = self.engine, self.cache
        prompts = [row.prompt for row in rows]
        if cache.blocks is None:
            cache.reserve(2)
        for row in rows:
            self._grow(row, len(row.prompt) + 1)
        width, w = max(len(p) for p in prompts), engine.weights
        skip = [width - len(p) for p in prompts]
        keys = torch.zeros((len(prompts), w.heads, width, w.head_dim), dtype=w.dtype, device=engine.device)
        values = torch.zeros_like(keys)
        ids, _ = left_padded(prompts, engine.eos_token_id)
        device = engine.device
        slots = [row.slot for row in rows]
        keep = cache.keeper(slots, [len(p) for p in prompts], skip, keys, values)
        logits = prefill(w, ids.to(device), torch.tensor(skip, device=device), keys, values, engine.cos, engine.sin,
                         engine.use_triton, engine.config,
                         torch.tensor([row.adapter for row in rows], dtype=torch.long, device=device), keep)
        columns = [len(p) for p in prompts]
        cache.write_rows(slots, col=columns, positions=columns, advance=[1] * len(rows),
                         adapters=[row.adapter for row in rows])
        for row, column in zip(rows, columns):
            row.column = column
        return logits

    # ---- the pool and the graphs ---------------------------------------------------------------------

    def _graph(self, bucket: int, reach: int):
        """The captured step for `bucket` rows (on the torch path also for the blocks it reads)."""
        engine = self.engine
        if engine.use_triton:
            key, kv_len = bucket, None
        else:
            step = READ_BLOCKS_STEP * self.cache.block_size
            kv_len = min(-(-reach // step) * step, self.cache.blocks_per_row * self.cache.block_size)
            key = (bucket, kv_len)
        state = self.cache.state(bucket)
        return self.cache.graph(key, lambda: engine.decode(state, bucket, kv_len=kv_len))

    def _buckets(self) -> list[int]:
        if self.bucket:
            return [self.bucket]
        return sorted({self.engine.bucket(rows) for rows in range(1, self.max_rows + 1)})

    def _begin(self) -> None:
        """Take the engine (and its cache) for the batch: the first row joins an empty batch."""
        cache = self.cache
        if cache.busy:
            raise RuntimeError("FastPhiEngine serves one generate/stream call or decode batch at a time")
        cache.busy = True
        if self.gpu_memory is not None and self.fixed is None:
            self.fixed = self.engine.serving_blocks(self.gpu_memory, self.prefill_tokens)
        if self.fixed is not None:
            cache.reserve(self.fixed)
        cache.reset_rows()
        self._pending = None

    def _end_if_idle(self) -> None:
        if not self.rows and not self.parked:
            self.cache.busy = False
            self._pending = None

