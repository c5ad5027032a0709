"""The training part of a run: pairs -> examples -> plan, the base loaded, the loop run from its
checkpoint to the end (run.py calls it once the pairs are ready)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.quiet import status
from pipeline.train.examples import Example, encode, eval_batches, plan_epochs
from pipeline.train.options import FineTune
from pipeline.train.outputs import RunFiles
from pipeline.train.pairs import Pair
from pipeline.train.progress import TrainingProgress
from pipeline.train.state import TrainState, load_state, save_state
from pipeline.train.trainer import LoraTrainer


def end_of_text(tokenizer, model) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id


class TrainingSession:
    def __init__(self, job: FineTune, source, tokenizer, device: torch.device, dtype: torch.dtype,
                 checkpointing: bool, files: RunFiles, run_key: str):
        self.job, self.source, self.tokenizer = job, source, tokenizer
        self.device, self.dtype, self.checkpointing = device, dtype, checkpointing
        self.files, self.run_key = files, run_key
        self.trainer: LoraTrainer | None = None

    def _examples(self, pairs: list[Pair], eos_id: int) -> list[Example]:
        return [encode(pair, self.tokenizer, eos_id) for pair in pairs]

    def run(self, train_pairs: list[Pair], eval_pairs: list[Pair], checkpoint) -> TrainState:
        from pipeline.llm.models import load_base

        job = self.job
        state = load_state(self.files.checkpoint, self.run_key) or TrainState()
        model = load_base(self.source, self.device, self.dtype, self.tokenizer)
        eos_id = end_of_text(self.tokenizer, model)
        examples, held_out = self._examples(train_pairs, eos_id), self._examples(eval_pairs, eos_id)
        plan = plan_epochs(examples, epochs=job.epochs, capacity=job.max_length, rows_per_step=job.rows_per_step,
                           seed=job.seed)
        held_batches = eval_batches(held_out, capacity=job.max_length, rows_per_step=job.rows_per_step)
        self.trainer = trainer = LoraTrainer(model, job, plan.total, pad_id=eos_id,
                                             gradient_checkpointing=self.checkpointing)
        if state.step:
            trainer.restore(state.tensors)
            status(f"resuming at step {state.step:,} of {plan.total:,} from {self.files.checkpoint}")
        status(f"training a LoRA adapter (r={job.lora_r}) of {self.source.name} on {len(examples):,} pairs: "
               f"{plan.total:,} step{'s' if plan.total != 1 else ''} on {self.device} ({str(self.dtype).removeprefix('torch.')}"
               f"{', gradient checkpointing' if self.checkpointing else ''})")
        progress = TrainingProgress(plan.total, state.step, job.quiet)
        try:
            state = trainer.train(examples, plan, state, evaluate=lambda: trainer.evaluate(held_out, held_batches),
                                  save=self._save, save_every=job.save_every,
                                  on_step=lambda s, loss, tokens: progress.update(s.step, loss, tokens),
                                  checkpoint=checkpoint)
        finally:
            progress.close()
        # The finished state too: a crash before the adapter is published resumes with no step left.
        state.tensors = trainer.capture()
        self._save(state)
        return state

    def _save(self, state: TrainState) -> None:
        save_state(Path(self.files.checkpoint), state, self.run_key)
