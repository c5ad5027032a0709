"""End to end: one Japanese question through the whole pipeline at the published shapes.

Builds random-weight checkpoints with the published shapes (phi-2: 2.78B parameters; opus-mt:
d_model 512, 6+6 layers, 60716-row vocabulary) in the published formats, then
1. runs `bilingual-qa ask --format json` in a subprocess, as a user would, and
2. loads BilingualQA once in this process and asks several times, to separate the first question
   (graph capture, warm-up) from the ones after it.
The answer is held at --answer-tokens new tokens (random weights never write end-of-text), and the
per-stage timings from the JSON are printed as a table.

    python benchmarks/ask_end_to_end.py                 # published shapes, on the GPU
    python benchmarks/ask_end_to_end.py --tiny          # smoke test on the CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from pipeline.checkpoints import build_tiny_marian, build_tiny_phi2

QUESTION = "金利が上昇すると、どのように個人や企業の経済活動に影響を与えるのでしょうか？"


def build(root: Path, tiny: bool, device: str) -> dict[str, Path]:
    if tiny:
        shapes = dict(phi={}, marian={})
        dtype = torch.float32
    else:
        shapes = dict(phi=dict(hidden=2560, layers=32, heads=32, vocab_rows=51200),
                      marian=dict(d_model=512, layers=6, ffn=2048, heads=8, vocab_size=60716))
        dtype = torch.float16
    paths = {"llm": root / "phi-2", "ja_en": root / "opus-mt-ja-en", "en_ja": root / "fugumt-en-ja"}
    start = time.perf_counter()
    if not (paths["llm"] / "config.json").exists():
        build_tiny_phi2(paths["llm"], dtype=dtype, device=device, **shapes["phi"])
        build_tiny_marian(paths["ja_en"], "ja", "en", **shapes["marian"])
        build_tiny_marian(paths["en_ja"], "en", "ja", **shapes["marian"])
    print(f"checkpoints ready in {time.perf_counter() - start:.1f} s under {root}", flush=True)
    return paths


def run_cli(paths: dict[str, Path], answer_tokens: int, extra: list[str]) -> tuple[dict, float]:
    command = [sys.executable, "-m", "pipeline", "ask", QUESTION, "--format", "json",
               "--llm", str(paths["llm"]), "--ja-en", str(paths["ja_en"]), "--en-ja", str(paths["en_ja"]),
               "--max-new-tokens", str(answer_tokens), *extra]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"CLI failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout), wall


def in_process(paths: dict[str, Path], answer_tokens: int, engine: str, mt_backend: str, beams: int | None,
               repeats: int) -> list[dict]:
    from pipeline import BilingualQA, GenerationSettings

    start = time.perf_counter()
    qa = BilingualQA.from_pretrained(str(paths["llm"]), str(paths["ja_en"]), str(paths["en_ja"]),
                                     engine=engine, mt_backend=mt_backend, beams=beams)
    load = time.perf_counter() - start
    rows = []
    for index in range(repeats):
        result = qa.ask(QUESTION, settings=GenerationSettings(max_new_tokens=answer_tokens))
        rows.append({"run": f"{engine}/{result.mt_backend} #{index + 1}", "load_s": round(load, 2) if index == 0 else None,
                     "tokens": result.generated_tokens, **result.timings})
    del qa
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    columns = ["run", "load_s", "tokens", "detect", "translate_question", "answer", "translate_answer", "total"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke test)")
    parser.add_argument("--root", default="/tmp/bilingual-qa-bench")
    parser.add_argument("--answer-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default="auto/auto,auto/transformers,transformers/transformers",
                        help="engine/mt-backend pairs to run in process")
    parser.add_argument("--beams", type=int, default=None)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    import transformers

    print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device {name}; "
          f"torch {torch.__version__}; transformers {transformers.__version__}")
    print(f"command: python {' '.join(sys.argv)}", flush=True)
    paths = build(Path(args.root) / ("tiny" if args.tiny else "published"), args.tiny, device)

    beams = ["--beams", str(args.beams)] if args.beams else []
    data, wall = run_cli(paths, args.answer_tokens, beams)
    rows = [{"run": f"CLI subprocess ({data['engine']}/{data['mt_backend']}), wall {wall:.1f} s",
             "tokens": data["generated_tokens"], **data["timings"]}]
    for config in args.configs.split(","):
        engine, mt_backend = config.split("/")
        rows += in_process(paths, args.answer_tokens, engine, mt_backend, args.beams, args.repeats)
    print()
    print(table(rows))
    out = os.environ.get("OUT")
    if out:
        Path(out, "ask_end_to_end.md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    main()
