"""Cold `bilingual-qa ask` processes of several source trees, in alternating rounds on one machine.

A cold process's time moves by a second or more between machines of the same kind, so a change is
judged against its "before" on the same machine, interleaved: each round runs the same command once
per tree (PYTHONPATH set to the tree; the rest of PYTHONPATH kept), timed from start to exit, with
when its answer was printed, its stage timings and its status lines.

    python benchmarks/cold_ask_rounds.py --root /tmp/cold --trees .,/tmp/before --rounds 3

ROOT holds checkpoints at the published shapes (cold_start.py or ask_end_to_end.build makes them);
its pycache/ keeps the processes' bytecode, as cold_start.py does. Run one throwaway round first to
fill the caches (Triton's kernels, the bytecode).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ask_end_to_end import QUESTION  # noqa: E402 - beside this file
from cold_start import bytecode_cache  # noqa: E402


def timed(command: list[str], env: dict, cwd: str) -> dict:
    began = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    events: list[tuple[float, str, str]] = []

    def pump(stream, tag: str) -> None:
        for line in stream:
            events.append((time.perf_counter() - began, tag, line.rstrip()))

    pumps = [threading.Thread(target=pump, args=(proc.stdout, "out")), threading.Thread(target=pump, args=(proc.stderr, "err"))]
    for thread in pumps:
        thread.start()
    proc.wait()
    for thread in pumps:
        thread.join()
    output = "\n".join(text for _, tag, text in events if tag == "out")
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - began,
            "printed_s": max((t for t, tag, _ in events if tag == "out"), default=None),
            "stages": json.loads(output).get("timings", {}) if proc.returncode == 0 else {},
            "status": [(round(t, 2), text) for t, tag, text in events if tag == "err"]}


def ask_command(root: Path, answer_tokens: int = 64) -> list[str]:
    """`ask` of the benchmark question on ROOT's checkpoints, as JSON (the bilingual-qa arguments)."""
    return ["ask", QUESTION, "--format", "json", "--llm", str(root / "phi-2"), "--ja-en", str(root / "opus-mt-ja-en"),
            "--en-ja", str(root / "fugumt-en-ja"), "--max-new-tokens", str(answer_tokens)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/cold"))
    parser.add_argument("--trees", default=".", help="comma-separated source trees (each holds pipeline/)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--answer-tokens", type=int, default=64)
    args = parser.parse_args()
    root = args.root.resolve()
    bytecode_cache("cache", root)
    command = [sys.executable, "-m", "pipeline", *ask_command(root, args.answer_tokens)]
    rest = os.environ.get("PYTHONPATH", "").split(":", 1)[1:]  # the first entry is the tree's place
    trees = args.trees.split(",")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; command: {' '.join(sys.argv)}")
    walls: dict[str, list[float]] = {tree: [] for tree in trees}
    for round_ in range(args.rounds):
        for tree in trees:
            env = dict(os.environ, PYTHONPATH=":".join([str(Path(tree).resolve()), *rest]))
            run = timed(command, env, str(root))
            walls[tree].append(run["wall_s"])
            status = "; ".join(f"{t:.2f} {text[:70]}" for t, text in run["status"])
            print(f"round {round_} {tree}: rc {run['rc']} wall {run['wall_s']:.2f} s, answer printed at "
                  f"{run['printed_s'] or float('nan'):.2f} s, stages {run['stages']} | {status}", flush=True)
    for tree, values in walls.items():
        print(f"{tree}: walls {['%.2f' % w for w in values]}, mean {sum(values) / len(values):.2f} s")


if __name__ == "__main__":
    main()
