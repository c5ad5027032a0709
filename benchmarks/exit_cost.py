"""What ending a cold `ask` process costs: the normal interpreter exit against os._exit.

Runs `bilingual-qa ask` (the CLI's entry point without quick_exit's wrapper) in processes that end
either through Python's normal exit or through os._exit after flushing, alternating, and reports
when each answer was printed and when the process was gone.

    python benchmarks/exit_cost.py --root /tmp/cold --rounds 3

ROOT as for cold_ask_rounds.py; run a throwaway round first to fill the caches.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cold_ask_rounds import ask_command, timed  # noqa: E402 - beside this file
from cold_start import bytecode_cache  # noqa: E402

# The child: the command's own body (cli.run unwrapped), then the exit asked for.
CHILD = """
import os, sys
from pipeline import cli
sys.argv = ["bilingual-qa", *sys.argv[2:]]
code = 0
try:
    cli.run.__wrapped__()
except SystemExit as done:
    code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
if os.environ["EXIT_MODE"] == "os._exit":
    sys.stdout.flush(); sys.stderr.flush(); os._exit(code)
sys.exit(code)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/cold"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = args.root.resolve()
    bytecode_cache("cache", root)
    ask = ask_command(root)
    for round_ in range(args.rounds):
        for mode in ("normal", "os._exit"):
            run = timed([sys.executable, "-c", CHILD, "-", *ask], dict(os.environ, EXIT_MODE=mode), str(root))
            after = run["wall_s"] - (run["printed_s"] or run["wall_s"])
            print(f"round {round_} {mode}: rc {run['rc']}, answer printed at {run['printed_s'] or float('nan'):.2f} s, "
                  f"gone at {run['wall_s']:.2f} s ({after:.2f} s after the answer)", flush=True)


if __name__ == "__main__":
    main()
