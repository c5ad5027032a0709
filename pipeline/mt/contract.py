"""What every translation backend is: source token ids in, target token ids out.

The `Translator` (translator.py) owns tokenisation, sentence splitting, batching and length bounds;
a backend only decodes. Every backend keeps this contract, so the translator, the batch job runner
and the sentence splitter use any of them unchanged. The helpers here are the ones the backends
share (backends.py, fast_marian.py), kept apart so that neither imports the other.
"""

from __future__ import annotations

from typing import Protocol

import torch


class MTBackend(Protocol):
    name: str
    concurrent: bool  # whether two threads may call generate at once (a backend without it: yes)

    def generate(self, batch: list[list[int]], max_new_tokens: int, num_beams: int) -> list[list[int]]:
        """Translate each row of source ids (ending in </s>, unpadded).

        Returns each row's target ids without the decoder start token, end-of-sentence or padding,
        at most `max_new_tokens` long.
        """
        ...


def strip_special(ids: list[int], eos_token_id: int, pad_token_id: int, limit: int) -> list[int]:
    """A generated row up to its end-of-sentence, without padding."""
    out = []
    for token in ids:
        if token == eos_token_id:
            break
        if token != pad_token_id:
            out.append(token)
    return out[:limit]


def right_pad(rows: list[list[int]], pad_token_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids padded on the right to `width` (default: the longest row), on the CPU:
    ids [rows, width] and each row's length [rows]. Marian's encoder reads sources right-padded."""
    width = max(len(row) for row in rows) if width is None else width
    ids = torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows], dtype=torch.long)
    return ids, torch.tensor([len(row) for row in rows], dtype=torch.long)
