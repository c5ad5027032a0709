"""The loaded models: a thin map name -> BilingualQA, every answer model sharing one pair of translators.

Each model is loaded the way the CLI loads it: the first through `BilingualQA.from_pretrained`, every
further `--llm` through `Answerer.from_pretrained` (as `compare` does) beside the same translators.
A base and its LoRA adapters (`--llm` of each, or only adapters: their base is loaded unnamed) are one
family: the base weights load once, each adapter is attached to its engine unmerged (`Answerer.attach`,
llm/multi_lora.py), and the family's rows decode in one batch. An adapter alone, or one that cannot
be applied unmerged (saved whole modules), is merged into its own copy as `ask` does.
Each answer engine gets one `AnswerScheduler`; each translation direction one `TranslationBatcher`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pipeline.llm.answerer import Answerer
from pipeline.llm.models import LLMSource, resolve_llm
from pipeline.llm.multi_lora import unshareable_reason
from pipeline.loading import status
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
    base: str | None = None  # the base of LoRA adapters given as llms (None: the one each names)


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
        # One scheduler per engine: a base and its attached adapters share one (one batch).
        by_engine: dict[int, AnswerScheduler] = {}
        self.schedulers = {}
        for name, qa in qas.items():
            engine = qa.answerer.engine
            if id(engine) not in by_engine:
                by_engine[id(engine)] = AnswerScheduler(engine, max_rows=max_rows, on_tokens=on_tokens,
                                                        batching=batching)
            self.schedulers[name] = by_engine[id(engine)]

    @classmethod
    def load(cls, options: LoadOptions, on_tokens: Callable[[int], None] | None = None) -> "ModelRegistry":
        llms = list(dict.fromkeys(options.llms)) or [model_names()["llm"]]
        sources = {name: resolve_llm(name, options.base) for name in llms}
        loaded: list[BilingualQA] = []

        def load(name: str) -> Answerer:
            """`name` loaded as `ask --llm name` loads it; the first with the translators."""
            if not loaded:
                loaded.append(BilingualQA.from_pretrained(
                    name, options.ja_en, options.en_ja, device=options.device, dtype=options.dtype,
                    engine=options.engine, mt_backend=options.mt_backend, beams=options.beams, base=options.base))
                return loaded[0].answerer
            return Answerer.from_pretrained(sources.get(name, name), device=loaded[0].answerer.model.device,
                                            dtype=options.dtype, engine=options.engine)

        answerers: dict[str, Answerer] = {}
        for names in families(sources):
            if len(names) == 1:
                answerers[names[0]] = load(names[0])
                continue
            full = [name for name in names if sources[name].adapter is None]
            base = load(full[0] if full else sources[names[0]].base_name)
            for name in names:
                answerers[name] = base if sources[name].adapter is None else base.attach(sources[name])
        first = loaded[0]
        qas = {name: BilingualQA(answerers[name], first.ja_en, first.en_ja) for name in llms}
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
        for scheduler in {id(s): s for s in self.schedulers.values()}.values():
            scheduler.close()
        self.ja_en.close()
        self.en_ja.close()


def families(sources: dict[str, LLMSource]) -> list[list[str]]:
    """The names that share one copy of base weights (a checkpoint and LoRA adapters of it), in order;
    an adapter that cannot be applied unmerged is a family of its own (merged into its own copy)."""
    groups: dict[str, list[str]] = {}
    for name, source in sources.items():
        key = source.weights_key
        if source.adapter is not None and (reason := unshareable_reason(source.adapter)) is not None:
            status(f"adapter {name} is merged into a copy of its own base: {reason}")
            key = f"{key}\0{name}"
        groups.setdefault(key, []).append(name)
    return list(groups.values())
