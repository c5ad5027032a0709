"""What the training tests share besides fixtures (imported by name: pytest puts tests/train/ on the
path for the tests in it)."""

from __future__ import annotations

import json
from pathlib import Path

PAIRS = [("What is a bond?", "A bond pays a fixed interest until it matures."),
         ("What is inflation?", "Inflation is the rate at which prices rise."),
         ("What does a weaker yen do?", "It makes Japanese exports cheaper abroad.")]
# Small, fast and sure to learn three pairs by heart: a high learning rate, no dropout, one packed
# sequence a step (the three pairs fit one), many epochs.
LEARN = ["--epochs", "40", "--learning-rate", "1e-2", "--lora-dropout", "0", "--max-length", "128",
         "--batch-tokens", "128", "--device", "cpu", "--mt-backend", "transformers", "--beams", "1"]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r, ensure_ascii=False) + "\n").encode()
                              for r in records))
    return path
