"""The loaded models: a thin map name -> BilingualQA, every answer model sharing one pair of translators.

Each model is loaded the way the CLI loads it: the first through `BilingualQA.from_pretrained`, every
further `--llm` through `Answerer.from_pretrained` (as `compare` does) beside the same translators.
Each answer model gets one `AnswerScheduler`; each translation direction one `TranslationBatcher`.

Models are named, never located: a client sees each model's served name (`--served-model-name`, else
the directory's name for a local directory, else the hub id as given), never a path of this machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.errors import SettingsError
from pipeline.llm.answerer import Answerer
from pipeline.qa import BilingualQA, model_names
from pipeline.serve.batching import AnswerScheduler, TranslationBatcher


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
                 on_tokens: Callable[[int], None] | None = None, batching: str = "auto"):
        if not qas:
            raise ValueError("at least one answer model is needed")
        self.qas = dict(zip(served_names(list(qas)), qas.values()))
        self.default = next(iter(self.qas))
        first = self.qas[self.default]
        self.translator_names = {"ja_en": served_name(first.ja_en.name), "en_ja": served_name(first.en_ja.name)}
        self.ja_en = TranslationBatcher(first.ja_en)
        self.en_ja = TranslationBatcher(first.en_ja)
        self.schedulers = {name: AnswerScheduler(qa.answerer.engine, max_rows=max_rows, on_tokens=on_tokens,
                                                 batching=batching)
                           for name, qa in self.qas.items()}

    @classmethod
    def load(cls, options: LoadOptions, on_tokens: Callable[[int], None] | None = None) -> "ModelRegistry":
        llms = list(dict.fromkeys(options.llms)) or [model_names()["llm"]]
        names = served_names(llms, options.served_names)
        first = BilingualQA.from_pretrained(llms[0], options.ja_en, options.en_ja, device=options.device,
                                            dtype=options.dtype, engine=options.engine,
                                            mt_backend=options.mt_backend, beams=options.beams)
        qas = {names[0]: first}
        for name, locator in zip(names[1:], llms[1:]):
            answerer = Answerer.from_pretrained(locator, device=first.answerer.model.device, dtype=options.dtype,
                                                engine=options.engine)
            qas[name] = BilingualQA(answerer, first.ja_en, first.en_ja)
        return cls(qas, max_rows=options.max_rows, on_tokens=on_tokens, batching=options.batching)

    @property
    def names(self) -> list[str]:
        return list(self.qas)

    def get(self, name: str | None) -> tuple[str, BilingualQA, AnswerScheduler]:
        """The served name, pipeline and scheduler of the model `name` names (its served name, or a hub
        id's last part), or of the default."""
        if name is None or name == "":
            name = self.default
        if name not in self.qas:
            matches = [n for n in self.qas if n.rsplit("/", 1)[-1] == name]
            if len(matches) != 1:
                shown = name if len(name) <= 80 else name[:80] + "..."
                raise UnknownModelError(f"unknown model '{shown}'; served: {', '.join(self.qas)}")
            name = matches[0]
        return name, self.qas[name], self.schedulers[name]

    def models_of(self, name: str) -> dict[str, str]:
        """A result's "models" field in served names (`BilingualQA.models` has the locators)."""
        base = self.qas[name].answerer.base_name
        return {"llm": name, **({"llm_base": served_name(base)} if base else {}), **self.translator_names}

    def stopped_stages(self) -> list[str]:
        """The stage threads that have stopped (none until close(), unless one died)."""
        threads = [*self.ja_en.threads, *self.en_ja.threads, *(s.thread for s in self.schedulers.values())]
        return [thread.name for thread in threads if not thread.is_alive()]

    def close(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.close()
        self.ja_en.close()
        self.en_ja.close()
