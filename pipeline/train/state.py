"""A training run's checkpoint: everything the next step depends on, in one file replaced atomically.

The LoRA weights, AdamW's moments, the schedule, the loss scaler (float16), the random number
generators' states (LoRA dropout draws from them) and the position (the global step; the plan of
steps is recomputed from the seed, examples.py), with the losses so far. One file, written to a
temporary sibling, fsynced and renamed over the last (then the directory fsynced): a `kill -9` at any
moment leaves the previous checkpoint or the new one, never half, and the run resumed from it takes
exactly the steps an uninterrupted run takes (tests/train checks the adapter tensors are equal).

Read back with torch's weights_only loader: tensors, numbers, strings and containers, no code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import JobError
from pipeline.jobs.runner import write_atomically

STATE_VERSION = 1


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch_loss: float = 0.0  # summed loss over this epoch's answer tokens so far
    epoch_tokens: int = 0
    tokens_seen: int = 0  # real tokens trained on, all epochs
    history: list[dict] = field(default_factory=list)  # per finished epoch: train_loss, eval_loss
    tensors: dict = field(default_factory=dict)  # lora, optimizer, scheduler, scaler, rng (trainer.py)



def save_state(path: Path, state: TrainState, run_key: str) -> None:
    """Write `state` to `path` atomically (see the module docstring)."""
    payload = {"version": STATE_VERSION, "run": run_key, "step": state.step, "epoch_loss": state.epoch_loss,
               "epoch_tokens": state.epoch_tokens, "tokens_seen": state.tokens_seen, "history": state.history,
               **state.tensors}
    write_atomically(path, lambda f: torch.save(payload, f))


def load_state(path: Path, run_key: str) -> TrainState | None:
    """The checkpoint of this run (`run_key`), or None where there is none."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file: torch raises RuntimeError, pickle errors, EOFError...
        raise JobError(f"{path} cannot be read ({type(error).__name__}); pass --restart to start over") from None
    if payload.get("version") != STATE_VERSION or payload.get("run") != run_key:
        raise JobError(f"{path} belongs to another run; pass --restart to start over")
    scalars = ("version", "run", "step", "epoch_loss", "epoch_tokens", "tokens_seen", "history")
    return TrainState(payload["step"], payload["epoch_loss"], payload["epoch_tokens"], payload["tokens_seen"],
                      payload["history"], {key: value for key, value in payload.items() if key not in scalars})
