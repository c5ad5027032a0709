"""Each decode step's tokens and top logits on their way to the host, without the host waiting for them.

Two sets of pinned host buffers take turns: a step copies into one while the host still reads the
step before from the other. With `beside` the copies run on a second stream, so the next step's
kernels need not wait behind them on the decode stream (the copy overlaps that step); the copied
tensors are marked as used by that stream, so their memory is not handed out again before the copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sent:
    """One step's tokens and top logits on the host, readable once `ready` has passed."""

    tokens: torch.Tensor
    values: torch.Tensor
    ready: torch.cuda.Event | None

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()


class StepReader:
    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device, beside: bool):
        self.cuda = device.type == "cuda"
        self._sets = [(torch.empty(rows, dtype=torch.long, pin_memory=True),
                       torch.empty(rows, dtype=dtype, pin_memory=True)) for _ in range(2)] if self.cuda else []
        self._stream = torch.cuda.Stream(device) if self.cuda and beside else None

    def send(self, tokens: torch.Tensor, values: torch.Tensor) -> Sent:
        """Start copying a step's tokens [rows] and top logits [rows] to the host (on the CPU: as they are)."""
        if not self.cuda:
            return Sent(tokens, values, None)
        self._sets.reverse()  # the other set: the step before may still be read from this one
        stream = self._stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(tokens.device))
            tokens.record_stream(stream)
            values.record_stream(stream)
        with torch.cuda.stream(stream):  # None: the current stream
            host = [buffer[:len(t)].copy_(t, non_blocking=True) for buffer, t in zip(self._sets[0], (tokens, values))]
            ready = torch.cuda.Event()
            ready.record()
        return Sent(host[0], host[1], ready)
