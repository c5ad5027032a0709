"""Continuous batching: rows join a running decode batch and leave it between decode steps.

`generate` decodes a fixed set of prompts until the last one ends, so a question that arrives while
others are being answered waits for the whole batch. A `DecodeBatch` instead lets the server add a
row (prefilled alone, then decoded with the others) and drop a finished or abandoned row at once.

The contract, all from one thread:
- `room() -> int`: how many rows may join now (a request waits while there is none);
- `joinable(lengths) -> int`: how many of prompts of these lengths, in order, can join now (rows and
  the cache's room for their prompts; a request waits while it cannot);
- `check(prompt, settings)`: raise for a request that can never fit (InputTooLongError names the limit);
- `add([(prompt, settings[, adapter]), ...]) -> [(row, first_token), ...]`: prefill prompts (together
  where the engine can), each applying the engine's LoRA adapter number `adapter` (0 or left out: the
  base), return each one's row key and first token, or an error in the token's place for a row that
  failed alone (its logits overflowed; it did not join); a failure of the whole add joins none;
- `step() -> {row: token}`: one decode step for every live row, feeding each the token it last
  returned; an engine may hand a step's tokens back from the next call (the GPU runs on meanwhile);
  a row that failed alone gets its error in the token's place and is dropped;
- `drop(row)`: forget a row (its cache columns are freed);
- `warm()`: allocate and compile now, before the first request.

Every token is chosen by the one sampler (sampler.py), from the row's own seed and step.

`TransformersDecodeBatch` implements it for any transformers causal LM on any device: a manual decode
loop over a DynamicCache whose rows are left-padded to a shared column count, each row with its own
positions and attention mask, so a row decodes exactly what it would decode alone (up to float
rounding of a wider batch). `open_decode_batch` returns None for an engine that cannot step (the
server then falls back to gathering waiting questions into one `generate` call).
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.errors import InputTooLongError
from pipeline.llm.engine import non_finite_error, pad_left
from pipeline.llm.sampler import choose, sampling_rows, seed_of
from pipeline.spec import GenerationSettings


class DecodeBatch(Protocol):
    max_rows: int
    prefill_tokens: int  # padded prompt tokens one add() should hold (a caller admits in chunks)

    def room(self) -> int: ...

    def joinable(self, lengths: list[int]) -> int: ...

    def check(self, prompt: list[int], settings: GenerationSettings) -> None: ...

    def add(self, requests: list[tuple]) -> list[tuple[int, int]]: ...

    def step(self) -> dict[int, int]: ...

    def drop(self, row: int) -> None: ...

    def __len__(self) -> int: ...

    def warm(self) -> None: ...


def open_decode_batch(engine, max_rows: int = 64, batching: str = "auto",
                      gpu_memory: float | None = None) -> DecodeBatch | None:
    """A decode batch on `engine`'s model, or None for micro-batching (whole `generate` calls).

    `auto` and `continuous`: continuous batching where the engine can step (the fast engine's
    paged cache, fast_batch.py, its pool sized from `gpu_memory` bytes; transformers' models here);
    `micro`: whole `generate` calls.
    """
    if batching == "micro":
        return None
    opener = getattr(engine, "decode_batch", None)
    if opener is not None:  # an engine with its own step-wise implementation
        return opener(max_rows, gpu_memory=gpu_memory)
    if getattr(engine, "name", "") == "transformers":
        return TransformersDecodeBatch(engine.model, max_rows, engine.adapter_names)
    return None


@dataclass
class _Row:
    key: int
    next_token: int  # returned to the caller, not yet in the cache
    position: int  # the next token's position id
    settings: GenerationSettings
    seed: int  # the sampler's, for a sampling row
    adapter: int = 0
    step: int = 1  # tokens chosen so far


class TransformersDecodeBatch:
    """A DecodeBatch over a transformers causal LM and a DynamicCache (see the module docstring)."""

    def __init__(self, model, max_rows: int = 64, adapter_names=lambda adapters, rows: {}):
        self.model = model
        self.adapter_names = adapter_names  # the engine's: peft's per-row adapters, once any is loaded
        self.max_rows = max_rows
        self.prefill_tokens = 8192
        self.device = next(model.parameters()).device
        self.rows: list[_Row] = []
        self.cache = None  # DynamicCache, one batch row per entry of self.rows
        self.mask: torch.Tensor | None = None  # (rows, columns): 1 where a row has a real token
        self._keys = itertools.count()
        # transformers renamed past_key_values to cache (5.x deprecation); take whichever forward has.
        forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward  # peft's
        self._cache_arg = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"

    def __len__(self) -> int:
        return len(self.rows)

    def room(self) -> int:
        return self.max_rows - len(self.rows)

    def joinable(self, lengths: list[int]) -> int:
        return min(len(lengths), self.room())  # the DynamicCache grows as rows join

    def check(self, prompt: list[int], settings: GenerationSettings) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if not prompt:
            raise ValueError("every prompt needs at least one token")
        if limit is not None and len(prompt) + settings.max_new_tokens > limit:
            raise InputTooLongError(
                f"the prompt has {len(prompt)} tokens and the answer may take {settings.max_new_tokens};"
                f" the answer model holds at most {limit} tokens in all")

    def warm(self) -> None:
        pass

    def add(self, requests: list[tuple]) -> list[tuple[int, int]]:
        """One prefill per prompt (its row's adapter through peft), each merged into the shared
        DynamicCache in turn."""
        for prompt, settings, *_ in requests:
            self.check(prompt, settings)
        if len(requests) > self.room():
            raise RuntimeError(f"the decode batch has room for {self.room()} more rows, not {len(requests)}")
        added: list = []
        try:
            for request in requests:
                added.append(self._add(*request))
        except BaseException:  # none of these rows joins
            for key, _ in added:
                self.drop(key)
            raise
        return added

    @torch.inference_mode()
    def _add(self, prompt: list[int], settings: GenerationSettings, adapter: int = 0) -> tuple[int, int | Exception]:
        from transformers import DynamicCache

        ids = torch.tensor([prompt], device=self.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache},
                         position_ids=torch.arange(len(prompt), device=self.device)[None],
                         **self.adapter_names([adapter], 1))
        seed, key = seed_of(settings), next(self._keys)
        first, value = self._choose(out.logits[:, -1], [settings], [seed], [0])
        if not torch.isfinite(value[0]):
            return key, non_finite_error(out.logits.dtype)
        row = _Row(key, int(first[0]), len(prompt), settings, seed, adapter)
        self._merge(cache, len(prompt))
        self.rows.append(row)
        return row.key, row.next_token

    @staticmethod
    def _choose(logits: torch.Tensor, settings: list[GenerationSettings], seeds: list[int],
                steps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return choose(logits, sampling_rows(settings, seeds, steps, logits.device))

    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        if not self.rows:
            return {}
        columns = self.mask.shape[1]
        tokens = torch.tensor([[row.next_token] for row in self.rows], device=self.device)
        positions = torch.tensor([[row.position] for row in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype,
                                                     device=self.device)], dim=1)
        out = self.model(input_ids=tokens, attention_mask=self.mask, position_ids=positions,
                         use_cache=True, **{self._cache_arg: self.cache},
                         cache_position=torch.tensor([columns], device=self.device),
                         **self.adapter_names([row.adapter for row in self.rows], len(self.rows)))
        rows = self.rows
        tokens, values = self._choose(out.logits[:, -1], [r.settings for r in rows], [r.seed for r in rows],
                                      [r.step for r in rows])
        tokens, finite = tokens.tolist(), torch.isfinite(values).tolist()  # one copy to the host each
        chosen: dict[int, int | Exception] = {}
        for index, row in enumerate(rows):
            if not finite[index]:  # this row's logits overflowed: it fails alone
                chosen[row.key] = non_finite_error(out.logits.dtype)
                continue
            row.next_token, row.position, row.step = tokens[index], row.position + 1, row.step + 1
            chosen[row.key] = row.next_token
        for key, token in chosen.items():
            if isinstance(token, Exception):
                self.drop(key)
        return chosen

    def drop(self, key: int) -> None:
        keep = [i for i, row in enumerate(self.rows) if row.key != key]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask[index]
        # Columns no live row reads any more (left of every row's first token) are cut away.
        first_used = int(self.mask.any(dim=0).int().argmax())
        self.mask = self.mask[:, first_used:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first_used:]
            layer.values = layer.values[index, :, first_used:]

    def _merge(self, cache, length: int) -> None:
        """Append one prefilled row's cache: right-aligned, the narrower side padded on the left."""
        new_mask = torch.ones((1, length), dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.mask = cache, new_mask
            return
        width = max(self.mask.shape[1], length)
        self.mask = torch.cat([pad_left(self.mask, width), pad_left(new_mask, width)])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([pad_left(mine.keys, width, 2), pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([pad_left(mine.values, width, 2), pad_left(theirs.values, width, 2)])
