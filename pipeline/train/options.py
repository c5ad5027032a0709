"""What a fine-tune is asked to do: `FineTune`, one typed object for the CLI and Python alike.

No torch here: `bilingual-qa finetune --help` shows these defaults, and every check that needs no
model runs from this module before anything loads. The defaults are those users of peft and TRL
expect: LoRA r=16, alpha=32, dropout 0.05 on every linear layer of phi-2's blocks, learning rate
2e-4 with linear decay (transformers' Trainer's schedule), AdamW, gradients clipped at norm 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pipeline.errors import SettingsError

# Every linear layer of a phi-2 block: attention (q, k, v, dense) and MLP (fc1, fc2), as published
# adapters of phi-2 (and build_lora_adapter) target them.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
# The linear layers of phi-2 (PhiForCausalLM) a LoRA adapter can adapt and merge.
PHI2_LINEAR = (*DEFAULT_TARGETS, "lm_head")
GRADIENT_CHECKPOINTING_CHOICES = ("auto", "on", "off")
# --dtype's names (loading.DTYPES, which needs torch, knows them too).
DTYPE_NAMES = ("auto", "float16", "fp16", "half", "bfloat16", "bf16", "float32", "fp32", "float")
PHI2_POSITIONS = 2048  # phi-2 reads at most this many tokens: --max-length cannot exceed it


@dataclass
class FineTune:
    """Train a LoRA adapter of phi-2 on the question/answer pairs of `data` into the directory
    `output`; `pipeline.finetune` runs it (resuming an unfinished run of the same options): train/run.py."""

    data: str
    output: str
    llm: str | None = None  # phi-2 checkpoint to adapt: hub id or directory [default: $BILINGUAL_QA_LLM, phi-2]
    question_field: str | None = None  # default: question (or the instruction/input/output layout)
    answer_field: str | None = None
    ja_en: str | None = None  # the translator of Japanese sides [default: $BILINGUAL_QA_JA_EN, opus-mt-ja-en]
    memory: str | None = None  # a translation memory file (SQLite) shared with translate and ask
    beams: int | None = None
    mt_backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    epochs: int = 3
    learning_rate: float = 2e-4
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    batch_tokens: int = 4096
    max_length: int = 1024
    eval_fraction: float = 0.1
    seed: int = 0
    save_every: int = 100
    gradient_checkpointing: str = "auto"
    restart: bool = False
    quiet: bool = False

    def check(self) -> None:
        """Refuse options that cannot train, in one line, before any file is read."""
        whole = {"epochs": (self.epochs, 1), "lora_r": (self.lora_r, 1), "batch_tokens": (self.batch_tokens, 16),
                 "max_length": (self.max_length, 8), "save_every": (self.save_every, 1), "seed": (self.seed, 0)}
        for name, (value, low) in whole.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SettingsError(f"{name} must be a whole number of at least {low}, not {value!r}")
        positive = {"learning_rate": self.learning_rate, "lora_alpha": self.lora_alpha}
        for name, value in positive.items():
            if not _finite(value) or value <= 0:
                raise SettingsError(f"{name} must be a finite number above 0, not {value!r}")
        if not _finite(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise SettingsError(f"lora_dropout must be from 0 up to (not including) 1, not {self.lora_dropout!r}")
        if not _finite(self.eval_fraction) or not 0 <= self.eval_fraction < 1:
            raise SettingsError(f"eval_fraction must be from 0 up to (not including) 1, not {self.eval_fraction!r}")
        if self.max_length > PHI2_POSITIONS:
            raise SettingsError(f"--max-length {self.max_length}: phi-2 reads at most {PHI2_POSITIONS} tokens")
        if self.batch_tokens < self.max_length:
            raise SettingsError(f"--batch-tokens {self.batch_tokens} is below --max-length {self.max_length}: "
                                "a batch must hold at least one sequence of the longest length")
        if not self.target_modules or any(not name.strip() for name in self.target_modules):
            raise SettingsError("--target-modules needs one or more module names (e.g. q_proj,k_proj,v_proj,dense)")
        unknown = [name for name in self.target_modules if name.rsplit(".", 1)[-1] not in PHI2_LINEAR]
        if unknown:
            raise SettingsError(f"--target-modules: phi-2 has no linear layer '{unknown[0]}'; choose among"
                                f" {', '.join(PHI2_LINEAR)}")
        if self.dtype not in DTYPE_NAMES:
            raise SettingsError(f"unknown dtype '{self.dtype}': use auto, float16, bfloat16 or float32")
        if self.gradient_checkpointing not in GRADIENT_CHECKPOINTING_CHOICES:
            raise SettingsError(f"gradient_checkpointing must be one of {', '.join(GRADIENT_CHECKPOINTING_CHOICES)}")

    @property
    def rows_per_step(self) -> int:
        """Packed sequences (each at most max_length tokens) per optimizer step."""
        return self.batch_tokens // self.max_length

    def training_options(self) -> dict:
        """The options that change the adapter's weights (the card shows them; the fingerprint holds them).
        Not the device, --save-every, --gradient-checkpointing or --quiet: they change how, not what."""
        names = ("epochs", "learning_rate", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
                 "batch_tokens", "max_length", "eval_fraction", "seed", "dtype")
        values = asdict(self)
        return {name: list(values[name]) if name == "target_modules" else values[name] for name in names}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
