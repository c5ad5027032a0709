"""Pairs -> token ids -> packed sequences -> the batches of every step, decided before training starts.

An example is `ask`'s prompt for the question (llm/prompt.py, the same ids `ask` sends) followed by
the answer as phi-2 writes it after `Output:` and the end-of-text id: the loss is on the answer's
tokens and end-of-text only, so the adapter learns what to answer and where to stop.

Short examples are packed into sequences of at most `max_length` tokens (best fit, in an order
shuffled per epoch from the seed) without attending across examples: each example's position ids
start at 0, and transformers' masks (masking_utils, for sdpa and eager attention alike) read a
position that does not follow its neighbour as the start of a new sequence and keep attention
inside each one. So a packed example's logits are the example's alone (tests/train checks it) and
no pad token is computed but the few that end a batch's shorter sequences.

The plan of every epoch is a pure function of the examples and the options: a resumed run
recomputes it and goes on at the step its checkpoint names.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from pipeline.llm.prompt import prompt_ids
from pipeline.train.pairs import Pair, answer_ids

IGNORE = -100  # no loss at this position


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]
    prompt_tokens: int  # the first ids are the prompt; the rest (answer, end-of-text) is learned

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def targets(self) -> list[int]:
        """Per position, the next id where it belongs to the answer, else IGNORE."""
        ids = self.ids
        return [ids[i + 1] if i + 1 >= self.prompt_tokens else IGNORE for i in range(len(ids) - 1)] + [IGNORE]


def encode(pair: Pair, tokenizer, eos_id: int) -> Example:
    prompt = prompt_ids(tokenizer, pair.question)
    return Example(tuple(prompt + answer_ids(tokenizer, pair.answer) + [eos_id]), len(prompt))


def pack(lengths: list[int], order: list[int], capacity: int) -> list[list[int]]:
    """Example indices (taken in `order`) -> sequences of at most `capacity` tokens: each example
    goes to the fullest sequence it still fits (best fit), else starts one."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the best fit is the first with room enough
    for index in order:
        size = lengths[index]
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        if room - size > 0:
            bisect.insort(free, (room - size, row))
    return rows


@dataclass(frozen=True)
class Plan:
    """Every step of every epoch: steps[epoch][step] is a list of sequences of example indices."""

    steps: list[list[list[list[int]]]]

    @property
    def total(self) -> int:
        return sum(len(epoch) for epoch in self.steps)

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within it) of a global step."""
        for epoch, steps in enumerate(self.steps):
            if step < len(steps):
                return epoch, step
            step -= len(steps)
        raise IndexError(step)


def plan_epochs(examples: list[Example], *, epochs: int, capacity: int, rows_per_step: int, seed: int) -> Plan:
    lengths = [len(example) for example in examples]
    steps = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(examples), generator=generator).tolist()
        rows = pack(lengths, order, capacity)
        steps.append([rows[i:i + rows_per_step] for i in range(0, len(rows), rows_per_step)])
    return Plan(steps)


def eval_batches(examples: list[Example], *, capacity: int, rows_per_step: int) -> list[list[list[int]]]:
    """The held-out examples, packed in their own order (the same batches after every epoch)."""
    rows = pack([len(example) for example in examples], list(range(len(examples))), capacity)
    return [rows[i:i + rows_per_step] for i in range(0, len(rows), rows_per_step)]


@dataclass
class Batch:
    ids: torch.Tensor  # [rows, length]
    positions: torch.Tensor  # each example's positions from 0; the padding after it, too
    targets: torch.Tensor  # the id to predict at each position, IGNORE where none
    tokens: int  # real (non-padding) tokens
    target_tokens: int

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.ids.to(device, non_blocking=True), self.positions.to(device, non_blocking=True),
                     self.targets.to(device, non_blocking=True), self.tokens, self.target_tokens)


def make_batch(examples: list[Example], rows: list[list[int]], pad_id: int) -> Batch:
    """Sequences of example indices -> tensors, each sequence padded to the longest of the batch."""
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for index in row:
            example = examples[index]
            n = len(example)
            ids[r, at:at + n] = torch.tensor(example.ids)
            positions[r, at:at + n] = torch.arange(n)
            targets[r, at:at + n] = torch.tensor(example.targets)
            at += n
        tokens += at
        positions[r, at:] = torch.arange(width - at)  # the padding is a sequence of its own
    return Batch(ids, positions, targets, tokens, int((targets != IGNORE).sum()))
