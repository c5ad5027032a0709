"""Stages 2 and 4: translate with a MarianMT model (Japanese->English, English->Japanese).

`Translator` is usable alone: `Translator.from_pretrained("Helsinki-NLP/opus-mt-ja-en").translate([...])`.
It splits each text into sentences (sentences.py), translates all sentences of all texts together in
length-sorted batches under a token budget (little padding), bounds each output's length against its
input's so a looping model cannot run away, and rebuilds every text in its original shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import InputTooLongError
from pipeline.loading import load_pretrained, load_tokenizer, locate_model, resolve_device, resolve_dtype
from pipeline.mt.backends import MTBackend, select_mt_backend
from pipeline.text.sentences import plan_text, rebuild, sentences_of, split_to_fit

MAX_SENTENCE_TOKENS = 256  # longer sentences are cut at commas/spaces first; Marian reads 512 at most
MODEL_MAX_TOKENS = 512
DEFAULT_BATCH_TOKENS = 8192
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
    pieces_per_sentence: list[int]
    ids: list[list[int]]  # the pieces' token ids, in the order assemble() reads their translations


@dataclass
class TranslationBatch:
    indices: list[int]
    ids: list[list[int]]


class Translator:
    def __init__(self, model, tokenizer, backend: MTBackend, *, name: str, target_lang: str,
                 num_beams: int | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS):
        self.model = model
        self.tokenizer = tokenizer
        self.backend = backend
        self.name = name
        self.target_lang = target_lang
        self.num_beams = num_beams or getattr(model.generation_config, "num_beams", 1) or 1
        self.batch_tokens = batch_tokens

    @classmethod
    def from_pretrained(cls, name: str, *, device: str | torch.device = "auto", dtype: str | None = None,
                        backend: str = "auto", target_lang: str | None = None, num_beams: int | None = None,
                        batch_tokens: int = DEFAULT_BATCH_TOKENS, option: str = "--ja-en") -> "Translator":
        """Load a MarianMT model by hub id or local directory (`option` names it in error messages)."""
        from transformers import MarianMTModel

        device = device if isinstance(device, torch.device) else resolve_device(device)
        directory = locate_model(name, option)
        model = load_pretrained(MarianMTModel, directory, name, device, resolve_dtype(dtype, device))
        tokenizer = load_tokenizer(directory, name)
        target = target_lang or _guess_target_lang(tokenizer, name)
        return cls(model, tokenizer, select_mt_backend(backend, model, directory, device), name=name,
                   target_lang=target, num_beams=num_beams, batch_tokens=batch_tokens)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def translate(self, texts: list[str]) -> list[str]:
        """Translate each text, keeping paragraphs, line breaks, list markers and code as they are."""
        plan = self.plan(texts)
        return self.assemble(plan, self.translate_ids(plan.ids))

    def plan(self, texts: list[str]) -> TranslationPlan:
        """Split texts into the token ids the model will translate (a caller may batch them with
        other plans' ids, as the server does) and remember how to rebuild each text."""
        layouts = [plan_text(text) for text in texts]
        sentences = [sentence for layout in layouts for sentence in sentences_of(layout)]
        # Each sentence is tokenised once: the ids that measure it are the ids the model reads.
        pieces_per_sentence, encoded = [], []
        for sentence, ids in zip(sentences, self._encode(sentences)):
            if len(ids) - 1 <= MAX_SENTENCE_TOKENS:  # - 1: the </s> the tokenizer appends
                pieces_per_sentence.append(1)
                encoded.append(ids)
            else:
                pieces = split_to_fit(sentence, MAX_SENTENCE_TOKENS, self.count_tokens)
                pieces_per_sentence.append(len(pieces))
                encoded.extend(self._encode(pieces))
        return TranslationPlan(layouts, pieces_per_sentence, encoded)

    def assemble(self, plan: TranslationPlan, translated: list[str]) -> list[str]:
        """The texts of `plan` rebuilt from their pieces' translations (in `plan.ids` order)."""
        pieces = iter(translated)
        joiner = " " if self.target_lang != "ja" else ""
        joined = [joiner.join(next(pieces) for _ in range(count)) for count in plan.pieces_per_sentence]
        results, position = [], 0
        for layout in plan.layouts:
            count = len(sentences_of(layout))
            results.append(rebuild(layout, joined[position:position + count], self.target_lang))
            position += count
        return results

    def plan_sentences(self, text: str) -> list[str]:
        """The pieces of `text` the model will see: its sentences, over-long ones cut to fit."""
        return [piece for sentence in sentences_of(plan_text(text))
                for piece in split_to_fit(sentence, MAX_SENTENCE_TOKENS, self.count_tokens)]

    def translate_sentences(self, sentences: list[str]) -> list[str]:
        """Translate sentences that each fit the model; outputs come back in input order."""
        return self._translate_ids(self._encode(sentences))

    def translate_ids(self, encoded: list[list[int]], num_beams: int | None = None) -> list[str]:
        """Translate tokenised pieces (each under the model's limit) in length-sorted batches."""
        return self._translate_ids(encoded, num_beams)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=False)["input_ids"] if texts else []

    def _translate_ids(self, encoded: list[list[int]], num_beams: int | None = None) -> list[str]:
        for ids in encoded:
            if len(ids) > MODEL_MAX_TOKENS:
                raise InputTooLongError(
                    f"a sentence is {len(ids)} tokens long; {self.name} reads at most {MODEL_MAX_TOKENS}"
                )
        outputs: list[str] = [""] * len(encoded)
        for batch in self._batches(encoded):
            for index, target in zip(batch.indices, self._generate(batch.ids, num_beams or self.num_beams)):
                outputs[index] = self.tokenizer.decode(target, skip_special_tokens=True).strip()
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

    def translate_file(self, input, output, *, source_lang: str = "auto", field: str = "text",
                       errors=None, restart: bool = False, quiet: bool = False, chunk_rows: int | None = None):
        """Translate every row of a .txt/.jsonl/.csv/.tsv file into this model's target language,
        exactly once and resumable (see jobs.py); returns a JobSummary."""
        from pipeline.jobs import runner as jobs

        return jobs.translate_file(input, output, to=self.target_lang, load_translator=lambda: self,
                                   options=jobs.translator_options(self), source_lang=source_lang, field=field,
                                   errors=errors, restart=restart, quiet=quiet,
                                   chunk_rows=chunk_rows or jobs.TRANSLATE_CHUNK_ROWS)
