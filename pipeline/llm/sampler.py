"""The one sampler: every decode path (the fast engine with graphs or without, its continuous batch,
the transformers engine's continuous batch and its `generate`) chooses tokens here.

Greedy rows take the argmax. A sampling row divides its logits by its temperature, keeps the fewest
tokens whose probability reaches top-p, and takes the argmax of those scores plus Gumbel noise (the
Gumbel-max trick: the same distribution as drawing from the softmax). The noise is a counter-based
hash of (the row's seed, the row's step, the token id), computed with integer operations on whatever
device the logits are on: a row's draw depends on nothing but its own seed and how many tokens it
has chosen, never on the other rows of its batch, the batch's size or the order rows joined in. So a
seeded answer is the same from `ask`, `ask --batch` and a server, on the same engine, as vLLM's
per-request generators give; and nothing here needs a host sync or a generator object, so it runs
beside a captured CUDA graph as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.spec import MAX_SEED, GenerationSettings

_M32 = 0xFFFFFFFF


def _times(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for 32-bit words held in int64, in two halves so no product overflows."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _M32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit words that spreads every input bit over the output (the "lowbias32"
    constants of Chris Wellons' hash prospector)."""
    x = x ^ (x >> 16)
    x = _times(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _times(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] float32 Gumbel(0, 1) noise, a function of (seed[r], step[r], token) alone."""
    row = _mix((_mix(seed & _M32) + _times(step & _M32, 0x9E3779B9)) & _M32)  # [rows]
    ids = torch.arange(vocab, device=seed.device, dtype=torch.long)
    bits = _mix(_mix(row[:, None] ^ ids[None, :]) ^ row[:, None])
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(uniform))


def fresh_seed() -> int:
    """A seed for a sampling row that was given none (torch's generator: torch.manual_seed repeats it)."""
    return int(torch.randint(0, MAX_SEED + 1, (), dtype=torch.long))


@dataclass
class SamplingRows:
    """Per batch row: temperature (0: greedy), top-p, seed and the tokens it has chosen so far, as
    tensors on the logits' device; `nucleus` (host side) says whether any row cuts at top-p < 1."""

    temperature: torch.Tensor  # float32 [rows]
    top_p: torch.Tensor  # float32 [rows]
    seed: torch.Tensor  # int64 [rows]
    step: torch.Tensor  # int64 [rows]
    nucleus: bool = True

    @classmethod
    def of(cls, settings: list[GenerationSettings], seeds: list[int], steps: list[int],
           device: torch.device | str) -> "SamplingRows":
        """Rows from their settings, seeds (a sampling row's own, or fresh_seed()) and steps."""
        floats = dict(dtype=torch.float32, device=device)
        return cls(torch.tensor([s.temperature for s in settings], **floats),
                   torch.tensor([s.top_p for s in settings], **floats),
                   torch.tensor(seeds, dtype=torch.long, device=device),
                   torch.tensor(steps, dtype=torch.long, device=device),
                   any(s.top_p < 1.0 and not s.greedy for s in settings))


def sampling_rows(settings: list[GenerationSettings], seeds: list[int], steps: list[int],
                  device: torch.device | str) -> SamplingRows | None:
    """SamplingRows for these rows, or None where every row is greedy (choose takes the argmax)."""
    if all(s.greedy for s in settings):
        return None
    return SamplingRows.of(settings, seeds, steps, device)


def seed_of(settings: GenerationSettings) -> int:
    """The seed a row samples with: its own, or a fresh one (greedy rows: 0, never read)."""
    if settings.greedy:
        return 0
    return settings.seed if settings.seed is not None else fresh_seed()


def choose(logits: torch.Tensor, rows: SamplingRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [rows], top logit [rows]) for logits [rows, vocab]: greedy where `rows` is None or a
    row's temperature is 0, else sampled as the module docstring says. The top logit is NaN or
    infinite exactly when the row's logits overflowed (its caller fails that row alone)."""
    values, tokens = torch.max(logits, -1)
    if rows is None:
        return tokens, values
    warm = rows.temperature > 0
    scores = logits.float() / torch.where(warm, rows.temperature, 1.0)[:, None]
    if rows.nucleus:
        ordered, order = scores.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        # keep the fewest reaching top_p; a row at top_p 1 keeps all (its sums may round past 1)
        reach = torch.where(rows.top_p < 1.0, rows.top_p, float("inf"))[:, None]
        scores = scores.scatter(-1, order, ordered.masked_fill(probs.cumsum(-1) - probs > reach, float("-inf")))
    sampled = (scores + gumbel_noise(rows.seed, rows.step, logits.shape[-1])).argmax(-1)
    return torch.where(warm, sampled, tokens), values
