"""The loaded models: a thin map name -> BilingualQA, every answer model sharing one pair of translators.

Each model is loaded the way the CLI loads it: the first through `BilingualQA.from_pretrained`, every
further `--llm` through `Answerer.from_pretrained` (as `compare` does) beside the same translators.
Each answer model gets one `AnswerScheduler`; each translation direction one `TranslationBatcher`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pipeline.llm.answerer import Answerer
from pipeline.qa import BilingualQA, model_names
from pipeline.serve.batching import AnswerScheduler, TranslationBatcher


class UnknownModelError(ValueError):
    pass


@dataclass
class LoadOptions:
    llms: list[str] = field(default_factory=list)
    ja_en: str | None = None
    en_ja: str | None = None
    device: str = "auto"
    dtype: str | None = None
    engine: str = "auto"
    mt_backend: str = "auto"
    beams: int | None = None
    max_rows: int = 64
    batching: str = "auto"  # continuous, micro, or auto (llm/continuous.py's open_decode_batch)


class ModelRegistry:
    def __init__(self, qas: dict[str, BilingualQA], *, max_rows: int = 64,
                 on_tokens: Callable[[int], None] | None = None, batching: str = "auto"):
        if not qas:
            raise ValueError("at least one answer model is needed")
        self.qas = qas
        self.max_rows = max_rows
        self.default = next(iter(qas))
        first = qas[self.default]
        self.ja_en = TranslationBatcher(first.ja_en)
        self.en_ja = TranslationBatcher(first.en_ja)
        self.schedulers = {name: AnswerScheduler(qa.answerer.engine, max_rows=max_rows, on_tokens=on_tokens,
                                                 batching=batching)
                           for name, qa in qas.items()}

    @classmethod
    def load(cls, options: LoadOptions, on_tokens: Callable[[int], None] | None = None) -> "ModelRegistry":
        llms = list(options.llms) or [model_names()["llm"]]
        first = BilingualQA.from_pretrained(llms[0], options.ja_en, options.en_ja, device=options.device,
                                            dtype=options.dtype, engine=options.engine,
                                            mt_backend=options.mt_backend, beams=options.beams)
        qas = {llms[0]: first}
        for name in llms[1:]:
            if name not in qas:
                answerer = Answerer.from_pretrained(name, device=first.answerer.model.device, dtype=options.dtype,
                                                    engine=options.engine)
                qas[name] = BilingualQA(answerer, first.ja_en, first.en_ja)
        return cls(qas, max_rows=options.max_rows, on_tokens=on_tokens, batching=options.batching)

    @property
    def names(self) -> list[str]:
        return list(self.qas)

    def get(self, name: str | None) -> tuple[BilingualQA, AnswerScheduler]:
        """The model `name` names (its full id, or a directory's last part), or the default."""
        if name is None or name == "":
            name = self.default
        if name not in self.qas:
            matches = [n for n in self.qas if n.rstrip("/").rsplit("/", 1)[-1] == name]
            if len(matches) != 1:
                raise UnknownModelError(f"unknown model '{name}'; loaded: {', '.join(self.qas)}")
            name = matches[0]
        return self.qas[name], self.schedulers[name]

    def close(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.close()
        self.ja_en.close()
        self.en_ja.close()
