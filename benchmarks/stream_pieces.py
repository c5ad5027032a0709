"""What showing an answer token by token costs on the host: `AnswerPieces.push` per token.

Every streamed answer (the CLI's `--stream`, the server's /v1/ask and chat streams) pushes each
generated id through AnswerPieces, which decodes the text and finds how much of it is settled. This
times pushes of natural English (the README, tokenised) at answer lengths of 200, 1,000 and 2,000
tokens, raw and trimmed, on a byte-level BPE tokenizer like phi-2's (pipeline/checkpoints.py builds
it; decoding cost is per token, not per vocabulary size). On the server these pushes run on the
event loop, so their cost per token, times the tokens/s of the whole batch, is loop time.

    python benchmarks/stream_pieces.py
"""

from __future__ import annotations

import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    from transformers import AutoTokenizer

    from pipeline.checkpoints import build_phi2_tokenizer
    from pipeline.llm.answerer import AnswerPieces

    directory = Path(tempfile.mkdtemp(prefix="stream-pieces-"))
    build_phi2_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    ids = tokenizer.encode(readme)[:2000]
    print(f"stream_pieces, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or 'CPU'},"
          f" python {platform.python_version()}; command: {' '.join(sys.argv)}\n")
    print("| answer tokens | raw: ms per answer | raw: us per push | trimmed: ms per answer | trimmed: us per push |")
    print("|---|---|---|---|---|")
    for length in (200, 1000, 2000):
        cells = []
        for raw in (True, False):
            best = float("inf")
            for _ in range(3):
                pieces = AnswerPieces(tokenizer, "What is a bond?", raw=raw)
                began = time.perf_counter()
                for token in ids[:length]:
                    pieces.push(token)
                pieces.finish()
                best = min(best, time.perf_counter() - began)
            cells += [f"{best * 1e3:.1f}", f"{best / length * 1e6:.0f}"]
        print(f"| {length:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
