"""Continuous batching on FastPhiEngine's static cache and CUDA graphs (the DecodeBatch contract of
continuous.py), so a question that reaches the server joins the rows being decoded at the next step.

Every row of the cache shares one column counter, as in `generate`: a step writes each row's token at
column `col` and attends from the row's own `starts` to `col`. A row joins by a prefill of its prompt
alone, whose keys and values are copied to the columns just left of `col` (rotary positions go with
the token, not the column, so the copy is exact); a prompt longer than `col` first moves the live
columns right. When `col` reaches the end of the cache, the live columns move left to column 0.
Rows are given the lowest free index, and a step runs the graph of the smallest batch bucket that
holds the highest live row: one client alone decodes in the one-row graph.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from pipeline.llm.continuous import select_token
from pipeline.llm.engine import GenerationSettings, non_finite_error
from pipeline.llm.phi_model import prefill

CACHE_COLUMNS = 1024  # columns of the shared cache: prompt and answer of every live row fit in it


@dataclass
class _Live:
    row: int  # its row of the engine's cache
    settings: GenerationSettings
    generator: torch.Generator | None  # for sampling


class FastDecodeBatch:
    def __init__(self, engine, max_rows: int = 64, columns: int = CACHE_COLUMNS):
        self.engine = engine
        columns = min(columns, engine.max_seq_len)
        self.max_rows = engine._rows_for(min(max_rows, engine.max_batch_size), columns)
        engine._ensure_cache(engine._bucket(self.max_rows), columns)
        self.columns = min(columns, engine._k_cache.shape[3])  # the cache may hold more, from generate
        self.col = 0  # the host's copy of the shared column
        self.rows: dict[int, _Live] = {}  # by the key add() returned
        self._free = torch.ones(engine.max_batch_size, dtype=torch.bool, device=engine.device)
        self._keys = itertools.count()

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, prompt: list[int], settings: GenerationSettings, adapter: int = 0) -> tuple[int, int]:
        engine, length = self.engine, len(prompt)
        if len(self.rows) >= self.max_rows:
            raise RuntimeError(f"the decode batch is full ({self.max_rows} rows)")
        if not prompt or length >= self.columns:
            raise ValueError(f"a prompt needs 1 to {self.columns - 1} tokens, not {length}")
        if not self.rows:
            self._begin()
        row = min(set(range(self.max_rows)) - {live.row for live in self.rows.values()})
        if self.col >= self.columns:
            self._compact()
        if length > self.col:
            self._shift(length - self.col)
        engine._adapter_rows[row] = adapter  # the LoRA adapter this row applies (0: the base; multi_lora.py)
        logits = self._prefill_row(prompt, row)
        generator = None
        if not settings.greedy:
            generator = torch.Generator(device="cpu").manual_seed(
                settings.seed if settings.seed is not None else int(torch.randint(0, 2**31, ())))
        first = self._choose(logits[0], settings, generator)
        engine._tokens[row] = first
        engine._positions[row] = length
        engine._starts[row] = self.col - length
        self._free[row] = False
        key = next(self._keys)
        self.rows[key] = _Live(row, settings, generator)
        return key, first

    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        if not self.rows:
            return {}
        engine = self.engine
        if self.col >= self.columns:
            self._compact()
        bucket = engine._bucket(max(live.row for live in self.rows.values()) + 1)
        engine._starts[:bucket].masked_fill_(self._free[:bucket], self.col)  # free rows: one column each
        if engine.use_graphs:
            graph, logits = self._graph(bucket)
            graph.replay()
        else:
            logits = engine._step(engine._state(bucket), bucket, kv_len=self.col + 1)
        self.col += 1
        # Free rows step too; their positions must stay inside the rotary tables.
        engine._positions.clamp_(max=engine.max_seq_len - 1)
        values, greedy = torch.max(logits, -1)
        values, greedy_ids = values.tolist(), greedy.tolist()  # the step's one wait for the GPU
        chosen = {}
        for key, live in self.rows.items():
            if not math.isfinite(values[live.row]):
                raise non_finite_error(engine.weights.dtype)
            chosen[key] = (greedy_ids[live.row] if live.settings.greedy
                           else self._choose(logits[live.row], live.settings, live.generator))
        if all(live.settings.greedy for live in self.rows.values()):
            engine._tokens[:bucket].copy_(greedy)
        else:
            for key, live in self.rows.items():
                engine._tokens[live.row] = chosen[key]
        return chosen

    def drop(self, key: int) -> None:
        live = self.rows.pop(key, None)
        if live is None:
            return
        self._free[live.row] = True  # from the next step it attends only to its own column
        if not self.rows:
            self.engine._busy = False

    def _graph(self, bucket: int):
        """The engine's captured step for `bucket` rows. Capturing resets the step's inputs and writes
        cache columns 0 and 1 of every row (its warm-up runs): live rows get them back."""
        engine = self.engine
        if bucket not in engine._graphs:
            inputs = (engine._col, engine._positions, engine._starts, engine._tokens)
            saved = [tensor.clone() for tensor in inputs]
            columns = [cache[:, :, :, :2].clone() for cache in (engine._k_cache, engine._v_cache)]
            engine._graph_for(bucket)
            for tensor, value in zip(inputs, saved):
                tensor.copy_(value)
            for cache, value in zip((engine._k_cache, engine._v_cache), columns):
                cache[:, :, :, :2] = value
        return engine._graphs[bucket]

    # ---- the shared columns ----------------------------------------------------------------------

    def _begin(self) -> None:
        engine = self.engine
        if engine._busy:
            raise RuntimeError("FastPhiEngine serves one generate/stream call or decode batch at a time")
        engine._busy = True
        self.col = 0
        engine._col.fill_(0)
        engine._starts.fill_(0)
        engine._positions.fill_(0)
        engine._tokens.fill_(engine.eos_token_id)

    def _prefill_row(self, prompt: list[int], row: int) -> torch.Tensor:
        """The prompt's keys and values into `row`, columns col - len .. col - 1; its last logits."""
        engine, w, length = self.engine, self.engine.weights, len(prompt)
        shape = (len(w.layers), 1, w.heads, length, w.head_dim)
        keys = torch.zeros(shape, dtype=w.dtype, device=engine.device)
        values = torch.zeros_like(keys)
        ids = torch.tensor([prompt], dtype=torch.long, device=engine.device)
        starts = torch.zeros(1, dtype=torch.long, device=engine.device)
        logits = prefill(w, ids, starts, keys, values, engine.cos, engine.sin, engine.use_triton, engine.config,
                         engine._adapter_rows[row:row + 1])
        engine._k_cache[:, row, :, self.col - length:self.col] = keys[:, 0]
        engine._v_cache[:, row, :, self.col - length:self.col] = values[:, 0]
        return logits

    def _shift(self, by: int) -> None:
        """Move every row's columns right by `by` (a new prompt is longer than the shared column)."""
        if self.col + by > self.columns and self._first_live_column() > 0:
            self._compact()
        if self.col + by > self.columns:
            raise RuntimeError("the decode batch's cache has no room for this prompt now")
        self._move(0, self.col, by)

    def _compact(self) -> None:
        """Move the live columns to the left edge (the shared column reached the cache's end)."""
        first = self._first_live_column()
        if first == 0:
            raise RuntimeError("a row of the decode batch has used every column of the cache")
        self._move(first, self.col, -first)

    def _first_live_column(self) -> int:
        if not self.rows:
            return self.col
        live = ~self._free[:self.max_rows]
        return int(self.engine._starts[:self.max_rows][live].min())

    def _move(self, first: int, end: int, by: int) -> None:
        """Columns first..end-1 of every row to first+by..end-1+by; starts and the column follow."""
        engine = self.engine
        for cache in (engine._k_cache, engine._v_cache):
            cache[:, :, :, first + by:end + by] = cache[:, :, :, first:end].clone()
        engine._starts.add_(by).clamp_(min=0)
        self.col += by
        engine._col.fill_(self.col)

    @staticmethod
    def _choose(logits: torch.Tensor, settings: GenerationSettings, generator) -> int:
        value = logits.float().max()
        if not bool(torch.isfinite(value)):
            raise non_finite_error(logits.dtype)
        return select_token(logits, settings, generator)
