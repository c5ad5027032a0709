"""What to load and how: one typed object that fills in what was not given the same way everywhere.

The CLI builds a `LoadSpec` from its options, and `BilingualQA.from_pretrained` and
`Translator.from_pretrained` build the same one from their arguments and keep it (`.spec`). A batch
job's identity comes from `fingerprint()` alone, so a job started on the command line and resumed
from Python (or the other way round) is recognised as the same job.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from pipeline.errors import SettingsError

DEFAULT_LLM = "microsoft/phi-2"
DEFAULT_JA_EN = "Helsinki-NLP/opus-mt-ja-en"
DEFAULT_EN_JA = "staka/fugumt-en-ja"
DEFAULT_BATCH_TOKENS = 8192
# Rows per chunk of a file job (jobs/workers.py), here so the CLI shows them without importing the
# job room. One ask chunk holds one best batch of the fast engine (128 rows); a crash costs at most that.
TRANSLATE_CHUNK_ROWS = 512
ASK_CHUNK_ROWS = 128

# The environment variable that names each role's model when no option does.
MODEL_ENV = {"llm": "BILINGUAL_QA_LLM", "ja_en": "BILINGUAL_QA_JA_EN", "en_ja": "BILINGUAL_QA_EN_JA"}
# The CLI option of each role, for error messages that tell the user what to change.
MODEL_OPTION = {"llm": "--llm", "ja_en": "--ja-en", "en_ja": "--en-ja"}
DIRECTION_ROLE = {"en": "ja_en", "ja": "en_ja"}  # target language -> the translation model's role
# The choices of --engine, --batching and --mt-backend, here so that the CLI can offer them without
# importing the rooms (and torch) that implement them.
ENGINE_CHOICES = ("auto", "fast", "transformers")
BATCHING_CHOICES = ("auto", "continuous", "micro")
BACKEND_CHOICES = ("auto", "transformers", "ctranslate2", "fast")


@dataclass(frozen=True)
class LoadSpec:
    """The models and the options that decide how they run; names are hub ids or local directories."""

    llm: str = DEFAULT_LLM
    ja_en: str = DEFAULT_JA_EN
    en_ja: str = DEFAULT_EN_JA
    device: str = "auto"
    dtype: str = "auto"
    engine: str = "auto"
    mt_backend: str = "auto"
    beams: int | None = None  # translation beam width; None: each model's published generation config
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    base: str | None = None  # the base a LoRA adapter given as `llm` merges into (None: the one it names)

    @classmethod
    def resolve(cls, llm: str | None = None, ja_en: str | None = None, en_ja: str | None = None, *,
                device: str | None = "auto", dtype: str | None = "auto", engine: str | None = "auto",
                mt_backend: str | None = "auto", beams: int | None = None,
                batch_tokens: int | None = None, base: str | None = None) -> "LoadSpec":
        """Fill what was not given: a model from its environment variable, else the published one;
        None options mean their default, so every caller spells the same job the same way."""
        names = {"llm": llm, "ja_en": ja_en, "en_ja": en_ja}
        defaults = cls()
        for role, name in names.items():
            names[role] = name or os.environ.get(MODEL_ENV[role]) or getattr(defaults, role)
        return cls(**names, device=device or "auto", dtype=dtype or "auto", engine=engine or "auto",
                   mt_backend=mt_backend or "auto", beams=beams,
                   batch_tokens=batch_tokens or DEFAULT_BATCH_TOKENS, base=base or None)

    @property
    def models(self) -> dict[str, str]:
        return {"llm": self.llm, "ja_en": self.ja_en, "en_ja": self.en_ja}

    def fingerprint(self, command: str, target_lang: str | None = None) -> dict:
        """Every load option that changes a job's output, and nothing else (not the device).

        `translate` depends on one translation model; `ask` on all three and the engine.
        """
        if command == "translate":
            return {"model": getattr(self, DIRECTION_ROLE[target_lang]), "beams": self.beams,
                    "batch_tokens": self.batch_tokens, "mt_backend": self.mt_backend, "dtype": self.dtype}
        options = {"models": self.models, "dtype": self.dtype, "engine": self.engine,
                   "mt_backend": self.mt_backend, "beams": self.beams}
        return {**options, "base": self.base} if self.base else options


# What one answer is generated with (llm/engine.py's engines read it; the CLI and the server build it).
MAX_SEED = 2**32 - 1  # what every engine's generator takes
# The lowest temperature sampled with: a positive one below it is raised to it, as vLLM does. Logits
# divided by 1e-300 are infinite, and their softmax is NaN; 0.01 is all but greedy already.
MIN_TEMPERATURE = 0.01


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    # phi-2's whole output: no stop check, nothing trimmed (read by the answer stage; engines ignore it)
    raw: bool = False

    def __post_init__(self):
        # The CLI's option types check the same; this is for Python callers, whose nan or negative
        # values would otherwise fail deep in sampling (or not at all: nan passes every comparison).
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SettingsError(f"max_new_tokens must be a whole number of at least 1, not {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise SettingsError(f"temperature must be a finite number of 0 or more, not {self.temperature!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", MIN_TEMPERATURE)  # frozen: set once, here
        if not (isinstance(self.top_p, (int, float)) and math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise SettingsError(f"top_p must be above 0 and at most 1, not {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise SettingsError(f"seed must be a whole number from 0 to {MAX_SEED}, not {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0
