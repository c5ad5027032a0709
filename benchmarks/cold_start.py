"""Cold start: one `bilingual-qa ask` process at the published shapes, and where its time goes.

Builds random-weight checkpoints with the published shapes (ask_end_to_end.build) in a local
directory, runs `bilingual-qa ask --format json` once to fill the caches (Triton's compiled kernels,
Python's bytecode, the CTranslate2 conversion), then measures the same command again as a fresh
process: its wall time, the pipeline's own stage timings (from the JSON), the rest (start-up:
imports, loading, warm-up, graph capture), the slowest imports (`python -X importtime`) and, with
--cprofile, the functions that took longest.

    python benchmarks/cold_start.py                   # published shapes, on the GPU (~2 minutes)
    python benchmarks/cold_start.py --tiny            # smoke test on the CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from ask_end_to_end import QUESTION, build


def ask_command(paths: dict[str, Path], answer_tokens: int, python_flags: list[str]) -> list[str]:
    return [sys.executable, *python_flags, "-m", "pipeline", "ask", QUESTION, "--format", "json",
            "--llm", str(paths["llm"]), "--ja-en", str(paths["ja_en"]), "--en-ja", str(paths["en_ja"]),
            "--max-new-tokens", str(answer_tokens)]


def run(command: list[str]) -> tuple[dict, float, str]:
    began = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"ask failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout), wall, proc.stderr


def import_summary(stderr: str, top: int) -> list[tuple[float, str]]:
    """(cumulative seconds, module) of the slowest top-level imports in `python -X importtime` output."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if not parts[1].isdigit():
            continue
        name = parts[2]
        if not name.startswith(" ") and "." not in name.strip():  # a top-level package
            rows.append((int(parts[1]) / 1e6, name.strip()))
        elif len(name) - len(name.lstrip()) <= 2:  # imported by a top-level one
            rows.append((int(parts[1]) / 1e6, name.strip()))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoints (a CPU smoke test)")
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--root", default=None, help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--cprofile", action="store_true", help="also profile the measured process (cProfile)")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: {name}; "
          f"torch {torch.__version__}; python {platform.python_version()}; command: {' '.join(sys.argv)}")
    root = Path(args.root or tempfile.mkdtemp(prefix="cold-start-"))
    paths = build(root, args.tiny, device)

    _, first, _ = run(ask_command(paths, args.answer_tokens, []))
    print(f"first process (fills the caches): {first:.1f} s wall")
    result, wall, stderr = run(ask_command(paths, args.answer_tokens, ["-X", "importtime"]))
    stages = result.get("timings", {})
    staged = sum(stages.values())
    print(f"\nmeasured process: {wall:.1f} s wall (with -X importtime); stages {staged:.1f} s; "
          f"the rest (imports, loading, warm-up) {wall - staged:.1f} s")
    print("| stage | s |\n|---|---|")
    for stage, seconds in stages.items():
        print(f"| {stage} | {seconds:.2f} |")
    print(f"\nslowest imports (cumulative, -X importtime), top {args.top}:")
    for seconds, module in import_summary(stderr, args.top):
        print(f"  {seconds:6.2f} s  {module}")
    _, plain, _ = run(ask_command(paths, args.answer_tokens, []))
    print(f"\nthe same process without -X importtime: {plain:.1f} s wall")
    if args.cprofile:
        profile = root / "ask.prof"
        plain_command = ask_command(paths, args.answer_tokens, [])
        run([sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "pipeline", *plain_command[3:]])
        print(f"\nslowest functions (cumulative, cProfile), top {args.top}:")
        pstats.Stats(str(profile)).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
