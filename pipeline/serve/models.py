"""The loaded models: a thin map name -> BilingualQA, every answer model sharing one pair of translators.

Each model is loaded the way the CLI loads it: the first through `BilingualQA.from_pretrained`, every
further `--llm` through `Answerer.from_pretrained` (as `compare` does) beside the same translators.
A base and its LoRA adapters (`--llm` of each, or only adapters: their base is loaded unnamed) are one
family: the base weights load once, each adapter is attached to its engine unmerged (`Answerer.attach`,
llm/multi_lora.py), and the family's rows decode in one batch. An adapter alone, or one that cannot
be applied unmerged (saved whole modules), is merged into its own copy as `ask` does.
Each answer engine gets one `AnswerScheduler`; each translation direction one `TranslationBatcher`.

Models are named, never located: a client sees each model's served name (`--served-model-name`, else
the directory's name for a local directory, else the hub id as given), never a path of this machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.errors import SettingsError
from pipeline.llm.answerer import Answerer
from pipeline.llm.memory import DEFAULT_GPU_MEMORY, limit_process
from pipeline.llm.models import LLMSource, resolve_llm
from pipeline.llm.multi_lora import unshareable_reason
from pipeline.loading import resolve_device
from pipeline.quiet import status
from pipeline.qa import BilingualQA, model_names
from pipeline.serve.batching import AnswerScheduler
from pipeline.serve.detection import Detector
from pipeline.serve.translation import TranslationBatcher


class UnknownModelError(ValueError):
    pass


def served_name(locator: str) -> str:
    """What clients call the model `locator` loads: a local directory by its name, a hub id as given."""
    path = Path(locator).expanduser()
    return path.resolve().name if path.is_dir() else locator


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
    gpu_memory: float = DEFAULT_GPU_MEMORY  # the card's share (<= 1) or bytes the process may take
    base: str | None = None  # the base of LoRA adapters given as llms (None: the one each names)
    served_names: list[str] = field(default_factory=list)  # per --llm, in order; the rest by served_name


def served_names(locators: list[str], given: list[str] = ()) -> list[str]:
    """Each model's served name (`given` first, in order), refusing two models under one name."""
    if len(given) > len(locators):
        raise SettingsError(f"{len(given)} served model names for {len(locators)} models")
    names = list(given) + [served_name(locator) for locator in locators[len(given):]]
    for name in names:
        if names.count(name) > 1:
            raise SettingsError(f"two models would be served as '{name}': name them with --served-model-name")
    return names


class ModelRegistry:
    """`qas` maps each model's served name to its pipeline (keys that are paths are named by
    `served_name`)."""

    def __init__(self, qas: dict[str, BilingualQA], *, max_rows: int = 64,
                 on_tokens: Callable[[int], None] | None = None, batching: str = "auto",
                 gpu_memory: int | None = None):
        if not qas:
            raise ValueError("at least one answer model is needed")
        self.qas = dict(zip(served_names(list(qas)), qas.values()))
        self.max_rows = max_rows
        self.default = next(iter(self.qas))
        first = self.qas[self.default]
        self.translator_names = {"ja_en": served_name(first.ja_en.name), "en_ja": served_name(first.en_ja.name)}
        self.ja_en = TranslationBatcher(first.ja_en)
        self.en_ja = TranslationBatcher(first.en_ja)
        self.detector = Detector()  # /detect's and /translate's: long texts in a process of its own
        # One scheduler per engine: a base and its attached adapters share one (one batch).
        by_engine: dict[int, AnswerScheduler] = {}
        self.schedulers = {}
        for name, qa in self.qas.items():
            engine = qa.answerer.engine
            if id(engine) not in by_engine:
                by_engine[id(engine)] = AnswerScheduler(engine, max_rows=max_rows, on_tokens=on_tokens,
                                                        batching=batching, gpu_memory=gpu_memory)
            self.schedulers[name] = by_engine[id(engine)]

    @classmethod
    def load(cls, options: LoadOptions, on_tokens: Callable[[int], None] | None = None) -> "ModelRegistry":
        llms = list(dict.fromkeys(options.llms)) or [model_names()["llm"]]
        sources = {name: resolve_llm(name, options.base) for name in llms}
        limit = limit_process(options.gpu_memory, resolve_device(options.device))  # before any weight loads
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
        qas = {served: BilingualQA(answerers[name], first.ja_en, first.en_ja)
               for name, served in zip(llms, served_names(llms, options.served_names))}
        return cls(qas, max_rows=options.max_rows, on_tokens=on_tokens, batching=options.batching, gpu_memory=limit)

    @property
    def names(self) -> list[str]:
        return list(self.qas)

    def get(self, name: str | None) -> tuple[str, BilingualQA, AnswerScheduler]:
        """The served name, pipeline and scheduler of the model `name` names (its served name, or a hub
        id's last part), or of the default."""
        if name is None or name == "":
            name = self.default
        if name not in self.qas:
            # a served name's last part ("phi-2" for "microsoft/phi-2"), or a caller's path to a model
            # directory served by its name (what `--server` sends for `--llm ./phi-2`): a choice among the
            # models loaded, never a location to load from
            last = name.rstrip("/").rsplit("/", 1)[-1]
            matches = [n for n in self.qas if n.rsplit("/", 1)[-1] in (name, last)]
            if len(matches) != 1:
                shown = name if len(name) <= 80 else name[:80] + "..."
                raise UnknownModelError(f"unknown model '{shown}'; served: {', '.join(self.qas)}")
            name = matches[0]
        return name, self.qas[name], self.schedulers[name]

    def models_of(self, name: str) -> dict[str, str]:
        """A result's "models" field in served names (`BilingualQA.models` has the locators)."""
        base = self.base_of(name)
        return {"llm": name, **({"llm_base": base} if base else {}), **self.translator_names}

    def base_of(self, name: str) -> str | None:
        """The served name of the base that `name` is a LoRA adapter of (None for a whole model): the
        name the base is served under when it is served too, else its own served name."""
        answerer = self.qas[name].answerer
        if not answerer.base_name:
            return None
        for other, qa in self.qas.items():
            if qa.answerer.engine is answerer.engine and not qa.answerer.base_name:
                return other
        return served_name(answerer.base_name)

    def stopped_stages(self) -> list[str]:
        """The stage threads that have stopped (none until close(), unless one died)."""
        threads = [*self.ja_en.threads, *self.en_ja.threads, *(s.thread for s in self.schedulers.values())]
        return [thread.name for thread in threads if not thread.is_alive()]

    def close(self, idle_wait: float = 0.5) -> None:
        """Stop every stage thread. A scheduler decodes the rows it still holds to their end when it
        stops, so the rows of callers cut at shutdown (cancelled, dropped at its next step) are first
        given up to `idle_wait` seconds to leave."""
        schedulers = list({id(s): s for s in self.schedulers.values()}.values())
        deadline = time.monotonic() + idle_wait
        while any(s.running_rows for s in schedulers) and time.monotonic() < deadline:
            time.sleep(0.01)
        for scheduler in schedulers:
            scheduler.close()
        self.ja_en.close()
        self.en_ja.close()
        self.detector.close()


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
