"""Where the answer ends, measured on the corpus of phi-2-style outputs (tests/text/answer_corpus.py).

Prints, for the rules of pipeline/text/answer_end.py:
1. precision and recall of the cut at the end (a cut counts as right only at the expected place),
   how often the repeated question / leading label is removed right, and exact answers;
2. tokens generated when generation stops as soon as the answer has ended (the engines' stop check)
   against generating to the output's end, as the source article's `generate(max_length=...)` did:
   - "phi-2 est.": GPT-2 pre-tokens (the byte-level split phi-2's tokenizer applies before BPE: a
     lower bound on phi-2 tokens; common English words are one token each in its 50k vocabulary);
   - "tiny BPE": the 600-piece byte-level BPE of pipeline.checkpoints (over-counts: small vocabulary);
   stops checked after every token (transformers engine, streaming) and every 16 tokens read one
   round late (FastPhiEngine.generate: up to 32 tokens past the end);
3. the stop check's CPU cost per call (decode of the ids + the rules) at each sample's length.

    python benchmarks/trim_corpus.py
"""

from __future__ import annotations

import datetime
import importlib.util
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import regex
import transformers

from pipeline.checkpoints import build_phi2_tokenizer
from pipeline.text.answer_end import END_OF_TEXT, EndWatch, locate_answer, trim_answer

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "text" / "answer_corpus.py"
# GPT-2's pre-tokenizer pattern (phi-2 uses the same byte-level BPE scheme)
PRE_TOKEN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
FAST_CHECK_EVERY = 16  # FastPhiEngine's default


def load_samples():
    spec = importlib.util.spec_from_file_location("answer_corpus", CORPUS)
    module = importlib.util.module_from_spec(spec)
    sys.modules["answer_corpus"] = module
    spec.loader.exec_module(module)
    return module.SAMPLES


def cut_quality(samples) -> dict[str, float]:
    cuts_made = cuts_needed = cuts_right = starts_needed = starts_right = starts_wrong = exact = 0
    for s in samples:
        trimmed = trim_answer(s.output, s.question)[0]
        made = locate_answer(s.output, s.question).end is not None
        cuts_made += made
        cuts_needed += s.tail_cut
        cuts_right += made and s.tail_cut and trimmed == s.expected
        start = locate_answer(s.output, s.question).start
        removed = bool(s.output[:start].strip())
        needed = not s.output.strip().startswith(s.expected)
        starts_needed += needed
        starts_right += removed and needed and trimmed.startswith(s.expected[:40])
        starts_wrong += removed and not needed
        exact += trimmed == s.expected
    return {
        "samples": len(samples), "cuts needed": cuts_needed, "cuts made": cuts_made, "cuts right": cuts_right,
        "precision": cuts_right / cuts_made, "recall": cuts_right / cuts_needed,
        "starts to clean": starts_needed, "cleaned right": starts_right, "cleaned wrongly": starts_wrong,
        "exact answers": exact,
    }


def fire_at(pieces: list[str], question: str) -> int | None:
    """After how many tokens the stop check first says the answer has ended."""
    text = ""
    for count, piece in enumerate(pieces, 1):
        text += piece
        if locate_answer(text, question, final=False).end is not None:  # ended, judged from scratch
            return count
    return None


def token_savings(samples, split) -> tuple[int, int, int]:
    """Tokens to the output's end; with a check every token; with checks every 16 read one round late."""
    full = every = fast = 0
    for s in samples:
        pieces = split(s.output.split(END_OF_TEXT)[0])  # generation stops at end-of-text anyway
        fired = fire_at(pieces, s.question)
        full += len(pieces)
        every += fired or len(pieces)
        fast += len(pieces) if fired is None else min(len(pieces), math.ceil(fired / FAST_CHECK_EVERY + 1) * FAST_CHECK_EVERY)
    return full, every, fast


def check_cost(samples, tokenizer) -> dict[str, float]:
    """Mean microseconds of one stop check over each sample's whole output: the decode, the rules
    alone (the answer's start already known, as in the engines' EndWatch), and the rules from scratch."""
    runs = 50

    def mean_us(call) -> float:
        began = time.perf_counter()
        for _ in range(runs):
            for s in samples:
                call(s)
        return (time.perf_counter() - began) / runs / len(samples) * 1e6

    ids = {s.name: tokenizer(s.output)["input_ids"] for s in samples}
    watches = {s.name: EndWatch(s.question) for s in samples}
    for s in samples:
        watches[s.name](s.output)
    return {
        "decode": mean_us(lambda s: tokenizer.decode(ids[s.name], skip_special_tokens=False)),
        "rules (EndWatch)": mean_us(lambda s: watches[s.name](s.output)),
        "rules from scratch": mean_us(lambda s: locate_answer(s.output, s.question, final=False).end),
    }


def main() -> None:
    samples = load_samples()
    with tempfile.TemporaryDirectory() as directory:
        tiny = build_phi2_tokenizer(Path(directory))

    def tiny_split(text: str) -> list[str]:
        return [tiny.decode([i]) for i in tiny(text)["input_ids"]]

    def pre_split(text: str) -> list[str]:
        return PRE_TOKEN.findall(text)

    print(f"# trim_corpus: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"transformers {transformers.__version__}")
    quality = cut_quality(samples)
    print("\n| measure | value |\n|---|---|")
    for key, value in quality.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")

    print("\n| tokens | to the output's end | stop checked every token | saved | every 16, one round late | saved |")
    print("|---|---|---|---|---|---|")
    for name, split in (("phi-2 est. (GPT-2 pre-tokens)", pre_split), ("tiny BPE (600 pieces)", tiny_split)):
        full, every, fast = token_savings(samples, split)
        print(f"| {name} | {full} | {every} | {full - every} ({(full - every) / full:.0%}) | {fast} | "
              f"{full - fast} ({(full - fast) / full:.0%}) |")

    lengths = [len(s.output) for s in samples]
    print(f"\nstop check per call on whole outputs ({min(lengths)}-{max(lengths)} characters, mean "
          f"{sum(lengths) / len(lengths):.0f}), CPU microseconds:")
    for part, micros in check_cost(samples, tiny).items():
        print(f"- {part}: {micros:.0f} us")


if __name__ == "__main__":
    main()
