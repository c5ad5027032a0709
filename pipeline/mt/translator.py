"""Stages 2 and 4: translate with a MarianMT model (Japanese->English, English->Japanese).

`Translator` is usable alone: `Translator.from_pretrained("Helsinki-NLP/opus-mt-ja-en").translate([...])`.
It splits each text into sentences (sentences.py), looks each sentence up in its translation memory
(memory.py), translates the new ones of all texts together in length-sorted batches under a token
budget (little padding), bounds each output's length against its input's so a looping model cannot
run away, and rebuilds every text in its original shape.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pipeline.errors import InputTooLongError
from pipeline.loading import load_pretrained, load_tokenizer, locate_model, resolve_device, resolve_dtype
from pipeline.mt.backends import planned_backend, planned_choice, select_mt_backend
from pipeline.mt.contract import MTBackend
from pipeline.model_files import read_config
from pipeline.mt.marian_direct import DirectMarian, lean_reason, load_direct_marian
from pipeline.mt.ctranslate2 import cache_key
from pipeline.mt.memory import MemoryStore, TranslationMemory, open_store
from pipeline.spec import DEFAULT_BATCH_TOKENS, DIRECTION_ROLE, LoadSpec
from pipeline.text.sentences import plan_text, rebuild, sentences_of, split_to_fit

MAX_SENTENCE_TOKENS = 256  # longer sentences are cut at commas/spaces first; Marian reads 512 at most
MODEL_MAX_TOKENS = 512
MAX_BATCH_ROWS = 256


def output_bound(source_tokens: int) -> int:
    """The most target tokens a source of this length may produce (a loop stops here)."""
    return min(MODEL_MAX_TOKENS - 1, 2 * source_tokens + 16)


def _guess_target_lang(tokenizer, name: str) -> str:
    """"ja" for a model into Japanese (by its tokenizer's target, else its name), else "en"."""
    declared = str(getattr(tokenizer, "target_lang", "") or "")
    into = declared or name.rstrip("/").rsplit("-", 1)[-1]
    return "ja" if into.lower() in ("ja", "jap", "jpn") else "en"


@dataclass
class TranslationPlan:
    layouts: list
    sentences: list[str]  # every sentence of the texts, in order
    known: dict[str, str]  # the memory's translations of some of them
    missing: list[str]  # the others, each once, in first-seen order
    pieces_per_sentence: list[int]  # per missing sentence: an over-long one is cut into pieces
    ids: list[list[int]]  # the pieces' token ids, in the order assemble() reads their translations
    num_beams: int | None = None  # what they are translated with (None: the translator's)


@dataclass
class TranslationBatch:
    indices: list[int]
    ids: list[list[int]]


def _runs_fast(backend: str, device: torch.device) -> bool:
    """Where the fast backend will translate: what lean loading and priming are for."""
    return device.type == "cuda" and planned_choice(backend, device) == "fast"


def _auto_config(directory: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(directory, trust_remote_code=False)


def _load_model(directory: str, name: str, device: torch.device, dtype: torch.dtype, runs_as: str, fast: bool):
    if fast:
        config = read_config(directory) or _auto_config(directory)
        if config.model_type == "marian" and lean_reason(config) is None:
            return load_direct_marian(directory, name, config, device, dtype, runs_as)
    from transformers import MarianMTModel

    return load_pretrained(MarianMTModel, directory, name, device, dtype, runs_as=runs_as)


class Translator:
    """`memory`: where translated sentences are kept (memory.py): an SQLite file's path, a store
    (to share one between translators), or None for this translator's own in-process memory.
    `model_key` names the checkpoint in memory keys (from_pretrained: a hash of its files)."""

    def __init__(self, model, tokenizer, backend: MTBackend, *, name: str, target_lang: str,
                 num_beams: int | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 memory: MemoryStore | str | Path | None = None, model_key: str | None = None,
                 spec: LoadSpec | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.backend = backend
        self.name = name
        self.target_lang = target_lang
        self.num_beams = num_beams or getattr(model.generation_config, "num_beams", 1) or 1
        self.batch_tokens = batch_tokens
        self.model_key = model_key or name
        self.use_memory(memory)
        # What was asked for (from_pretrained's arguments): a job's identity, as the CLI spells it.
        if spec is None and target_lang in DIRECTION_ROLE:
            spec = LoadSpec.resolve(**{DIRECTION_ROLE[target_lang]: name}, beams=num_beams, batch_tokens=batch_tokens)
        self.spec = spec

    @classmethod
    def from_pretrained(cls, name: str, *, device: str | torch.device = "auto", dtype: str | None = None,
                        backend: str = "auto", target_lang: str | None = None, num_beams: int | None = None,
                        batch_tokens: int = DEFAULT_BATCH_TOKENS, option: str = "--ja-en",
                        memory: MemoryStore | str | Path | None = None) -> "Translator":
        """Load a MarianMT model by hub id or local directory (`option` names it in error messages).

        Where the fast backend will translate, the weights load into its own modules
        (marian_direct.py) when it implements the checkpoint; else as a MarianMTModel."""
        store = open_store(memory)   # a bad memory file is refused before minutes of loading
        device = device if isinstance(device, torch.device) else resolve_device(device)
        directory = locate_model(name, option)
        torch_dtype = resolve_dtype(dtype, device)
        model = _load_model(directory, name, device, torch_dtype, planned_backend(backend, device, torch_dtype),
                            _runs_fast(backend, device))
        # No transformers model built: the tokenizer too is read without transformers where it can be.
        tokenizer = load_tokenizer(directory, name, lean=isinstance(model, DirectMarian))
        target = target_lang or _guess_target_lang(tokenizer, name)
        spec = LoadSpec.resolve(**{DIRECTION_ROLE[target]: name}, dtype=dtype, mt_backend=backend,
                                beams=num_beams, batch_tokens=batch_tokens)
        return cls(model, tokenizer, select_mt_backend(backend, model, directory, device), name=name,
                   target_lang=target, num_beams=num_beams, batch_tokens=batch_tokens, memory=store,
                   model_key=f"{Path(directory).name}-{cache_key(directory)}", spec=spec)

    @staticmethod
    def prime(*, device: torch.device, dtype: str | None = None, backend: str = "auto") -> Future | None:
        """Where from_pretrained will translate on the fast backend, start paying the first use of
        the GPU libraries it runs in the background (prime.py); else None. Wait for the future
        before the first translation."""
        if not _runs_fast(backend, device):
            return None
        from pipeline.mt.prime import prime_in_background

        return prime_in_background(device, resolve_dtype(dtype, device))

    def use_memory(self, memory: MemoryStore | str | Path | None) -> None:
        """Keep translations in `memory` from now on (see the class docstring); counters restart."""
        self.memory = TranslationMemory(open_store(memory))

    def memory_context(self, num_beams: int | None = None) -> dict:
        """Everything that changes a sentence's translation: memory entries are kept per context."""
        return {"model": self.model_key, "target": self.target_lang, "beams": num_beams or self.num_beams,
                "backend": self.backend.name, "variant": getattr(self.backend, "quantization", None),
                "dtype": str(self.model.dtype)}

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def translate(self, texts: list[str], progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Translate each text, keeping paragraphs, line breaks, list markers and code as they are.

        `progress(done, total)` is called after each batch, in sentence pieces (a job's progress bar)."""
        plan = self.plan(texts)
        return self.assemble(plan, self._translate_ids(plan.ids, progress=progress))

    def plan(self, texts: list[str], num_beams: int | None = None) -> TranslationPlan:
        """Split texts into sentences, take those the memory knows, and tokenise the rest into the ids
        the model will translate (a caller may batch them with other plans' ids, as the server does,
        translating them with `num_beams`, default this translator's)."""
        layouts = [plan_text(text) for text in texts]
        sentences = [sentence for layout in layouts for sentence in sentences_of(layout)]
        known, missing = self.memory.lookup(self.memory_context(num_beams), sentences)
        # Each sentence is tokenised once: the ids that measure it are the ids the model reads.
        pieces_per_sentence, encoded = [], []
        for sentence, ids in zip(missing, self._encode(missing)):
            if len(ids) <= MAX_SENTENCE_TOKENS:
                pieces_per_sentence.append(1)
                encoded.append(ids)
            else:
                pieces = split_to_fit(sentence, MAX_SENTENCE_TOKENS, self.count_tokens)
                pieces_per_sentence.append(len(pieces))
                encoded.extend(self._encode(pieces))
        return TranslationPlan(layouts, sentences, known, missing, pieces_per_sentence, encoded, num_beams)

    def assemble(self, plan: TranslationPlan, translated: list[str]) -> list[str]:
        """The texts of `plan` rebuilt from its pieces' translations (in `plan.ids` order); the new
        sentences go into the memory."""
        new = self._new_sentences(plan, translated)
        self.memory.remember(self.memory_context(plan.num_beams), list(new.items()))
        joined = _in_order(plan, new)
        results, position = [], 0
        for layout in plan.layouts:
            count = len(sentences_of(layout))
            results.append(rebuild(layout, joined[position:position + count], self.target_lang))
            position += count
        return results

    def sentence_translations(self, plan: TranslationPlan, translated: list[str]) -> list[str]:
        """Every sentence of the plan translated, in order."""
        return _in_order(plan, self._new_sentences(plan, translated))

    def _new_sentences(self, plan: TranslationPlan, translated: list[str]) -> dict[str, str]:
        """The translations of the sentences the memory lacked, each joined from its pieces'."""
        pieces = iter(translated)
        joiner = " " if self.target_lang != "ja" else ""
        return {sentence: joiner.join(next(pieces) for _ in range(count))
                for sentence, count in zip(plan.missing, plan.pieces_per_sentence)}

    def translate_ids(self, encoded: list[list[int]], num_beams: int | None = None) -> list[str]:
        """Translate tokenised pieces (each under the model's limit) in length-sorted batches."""
        return self._translate_ids(encoded, num_beams)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=False)["input_ids"] if texts else []

    def _translate_ids(self, encoded: list[list[int]], num_beams: int | None = None,
                       progress: Callable[[int, int], None] | None = None) -> list[str]:
        for ids in encoded:
            if len(ids) > MODEL_MAX_TOKENS:
                raise InputTooLongError(
                    f"a sentence is {len(ids)} tokens long; {self.name} reads at most {MODEL_MAX_TOKENS}"
                )
        outputs: list[str] = [""] * len(encoded)
        done = 0
        for batch in self._batches(encoded):
            for index, target in zip(batch.indices, self._generate(batch.ids, num_beams or self.num_beams)):
                outputs[index] = self.tokenizer.decode(target, skip_special_tokens=True).strip()
            done += len(batch.indices)
            if progress is not None:
                progress(done, len(encoded))
        return outputs

    def _batches(self, encoded: list[list[int]]) -> list[TranslationBatch]:
        """Length-sorted batches whose padded size stays under the token budget."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        batches, current = [], []
        for index in order:
            width = len(encoded[index])  # the longest so far, since rows come sorted
            if current and (width * (len(current) + 1) > self.batch_tokens or len(current) >= MAX_BATCH_ROWS):
                batches.append(TranslationBatch(current, [encoded[i] for i in current]))
                current = []
            current.append(index)
        if current:
            batches.append(TranslationBatch(current, [encoded[i] for i in current]))
        return batches

    def _generate(self, batch: list[list[int]], num_beams: int) -> list[list[int]]:
        """Decode one batch; on CUDA out-of-memory, halve it and retry, losing nothing."""
        bound = output_bound(max(len(row) for row in batch))
        try:
            outputs = self.backend.generate(batch, bound, num_beams)
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(batch) // 2
            return self._generate(batch[:half], num_beams) + self._generate(batch[half:], num_beams)
        return [out[: output_bound(len(row))] for row, out in zip(batch, outputs)]

    def job_options(self) -> dict:
        """The job's fingerprint options: those of the LoadSpec this translator was loaded from (what
        the `translate` command uses too, so a job started on the command line resumes from Python)."""
        if self.spec is None:  # built by hand for another target language
            return {"model": self.name, "beams": self.num_beams, "batch_tokens": self.batch_tokens,
                    "mt_backend": self.backend.name, "dtype": str(self.model.dtype)}
        return self.spec.fingerprint("translate", self.target_lang)

    def translate_file(self, input, output, *, source_lang: str = "auto", field: str = "text",
                       errors=None, restart: bool = False, quiet: bool = False, chunk_rows: int | None = None):
        """Translate every row of a .txt/.jsonl/.csv/.tsv file into this model's target language,
        exactly once and resumable (see pipeline/jobs); returns a JobSummary."""
        from pipeline.jobs import workers as jobs

        return jobs.translate_file(input, output, to=self.target_lang, load_translator=lambda: self,
                                   options=self.job_options(), source_lang=source_lang, field=field,
                                   errors=errors, restart=restart, quiet=quiet,
                                   chunk_rows=chunk_rows or jobs.TRANSLATE_CHUNK_ROWS)


def _in_order(plan: TranslationPlan, new: dict[str, str]) -> list[str]:
    """Each sentence of `plan`'s texts translated, from the memory or from `new`."""
    known = {**plan.known, **new}
    return [known[sentence] for sentence in plan.sentences]
