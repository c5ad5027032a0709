"""The LoRA training loop: plain torch, peft for the adapter layers, transformers' PhiForCausalLM.

peft wraps the chosen linear layers of the loaded base (its weights frozen in the run's dtype; the
adapter's A and B in float32, peft's default) and the loop runs the base's own modules: the blocks
(`PhiModel`) over packed sequences with their position ids (examples.py), then the output layer
only at the positions whose next token is learned (the answer and its end-of-text), in chunks.
So the 51,200-way logits of prompt tokens are never computed, and with gradient checkpointing a
chunk's logits are recomputed in the backward pass rather than kept.

AdamW (no weight decay), linear decay of the learning rate to 0 over all steps, gradients clipped
at norm 1: transformers' Trainer's defaults. float16 (GPUs without bfloat16) scales the loss
(torch.amp.GradScaler); bfloat16 and float32 need no scaling.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute

from pipeline.train.examples import IGNORE, Batch, Example, Plan, make_batch
from pipeline.train.options import FineTune
from pipeline.train.state import TrainState

LOSS_CHUNK = 1024  # learned positions whose logits are computed at once
MAX_GRAD_NORM = 1.0


def lora_config(options: FineTune):
    from peft import LoraConfig

    return LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                      target_modules=list(options.target_modules), bias="none", task_type="CAUSAL_LM")


class LoraTrainer:
    """One run's model, optimizer and schedule over `total_steps` steps."""

    def __init__(self, model, options: FineTune, total_steps: int, *, pad_id: int, gradient_checkpointing: bool):
        from peft import get_peft_model

        self.device, self.pad_id = model.device, pad_id
        self.checkpointing = gradient_checkpointing
        model.config.use_cache = False
        if gradient_checkpointing:
            # transformers 5.25 renamed it (the old name warns); earlier 5.x have only the old one
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(options.seed)  # the adapter's initial A (B starts at zero): the same every run
        with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            self.model = get_peft_model(model, lora_config(options))
        self.model.train()
        causal_lm = self.model.base_model.model
        self.blocks, self.head = causal_lm.model, causal_lm.lm_head
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(self.params, lr=options.learning_rate, weight_decay=0.0, **fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: max(0.0, 1.0 - step / max(total_steps, 1)))
        half = model.dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=half)

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(hidden).float(), targets, reduction="sum")

    def loss_sum(self, batch: Batch) -> torch.Tensor:
        """The summed cross-entropy of the batch's learned tokens."""
        # No cache: transformers builds the packed sequences' block-diagonal mask only without one.
        hidden = self.blocks(input_ids=batch.ids, position_ids=batch.positions, use_cache=False).last_hidden_state
        learned = batch.targets != IGNORE
        picked, targets = hidden[learned], batch.targets[learned]
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), LOSS_CHUNK):
            chunk = (picked[start:start + LOSS_CHUNK], targets[start:start + LOSS_CHUNK])
            if self.checkpointing and torch.is_grad_enabled():
                total = total + recompute(self._chunk_loss, *chunk, use_reentrant=False)
            else:
                total = total + self._chunk_loss(*chunk)
        return total

    def step(self, batch: Batch) -> float:
        """One optimizer step on `batch`; its summed loss."""
        batch = batch.to(self.device)
        total = self.loss_sum(batch)
        self.scaler.scale(total / max(batch.target_tokens, 1)).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(total.detach())

    @torch.no_grad()
    def evaluate(self, examples: list[Example], batches: list[list[list[int]]]) -> float | None:
        """The mean loss per learned token of the held-out examples (None without any)."""
        if not batches:
            return None
        self.model.eval()
        total, tokens = 0.0, 0
        for rows in batches:
            batch = make_batch(examples, rows, self.pad_id).to(self.device)
            total += float(self.loss_sum(batch))
            tokens += batch.target_tokens
        self.model.train()
        return total / max(tokens, 1)

    def capture(self) -> dict:
        """What a checkpoint holds besides the position (state.py)."""
        cuda = self.device.type == "cuda"
        return {"lora": {name: p.detach().to("cpu", copy=True) for name, p in self.model.named_parameters()
                         if p.requires_grad},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(self.device) if cuda else torch.empty(0, dtype=torch.uint8)}

    def restore(self, tensors: dict) -> None:
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in tensors["lora"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])
        if tensors["scaler"]:
            self.scaler.load_state_dict(tensors["scaler"])
        torch.set_rng_state(tensors["rng_cpu"])
        if self.device.type == "cuda" and tensors["rng_cuda"].numel():
            torch.cuda.set_rng_state(tensors["rng_cuda"], self.device)

    def train(self, examples: list[Example], plan: Plan, state: TrainState, *, evaluate: Callable[[], float | None],
              save: Callable[[TrainState], None], save_every: int, on_step: Callable[[TrainState, float, int], None],
              checkpoint: Callable[[str], None]) -> TrainState:
        """Steps from `state.step` to the plan's end; the epoch's losses after each epoch, a
        checkpoint every `save_every` steps (`checkpoint(point)`: tests' crash points)."""
        while state.step < plan.total:
            epoch, index = plan.locate(state.step)
            batch = make_batch(examples, plan.steps[epoch][index], self.pad_id)
            loss = self.step(batch)
            state.step += 1
            state.epoch_loss += loss
            state.epoch_tokens += batch.target_tokens
            state.tokens_seen += batch.tokens
            if index + 1 == len(plan.steps[epoch]):
                state.history.append({"epoch": epoch + 1, "train_loss": state.epoch_loss / max(state.epoch_tokens, 1),
                                      "eval_loss": evaluate()})
                state.epoch_loss, state.epoch_tokens = 0.0, 0
            on_step(state, loss / max(batch.target_tokens, 1), batch.tokens)
            checkpoint("after_step")
            if state.step % save_every == 0 and state.step < plan.total:
                state.tensors = self.capture()
                save(state)
                checkpoint("after_save")
        return state

    def save_adapter(self, directory: str) -> None:
        """The adapter as peft saves it (adapter_config.json, adapter_model.safetensors)."""
        # No whole embedding copies: the vocabulary is the base's (peft would save them where lm_head is adapted).
        self.model.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)
