"""Cold start: `bilingual-qa --help`, one cold `bilingual-qa ask` process at the published shapes,
and `ask --server` against a running `bilingual-qa serve`, with where the time goes.

Builds random-weight checkpoints with the published shapes (ask_end_to_end.build) in a local
directory, then
1. times `bilingual-qa --help` (--help-runs processes) and checks that it imports no torch;
2. runs `bilingual-qa ask --format json` once under `python -X importtime` to fill the caches
   (Triton's compiled kernels, Python's bytecode) and see the slowest imports and who imported the
   heavy modules an answer does not need (torch.distributed.tensor, sympy, sklearn), then measures
   the same command as a fresh process: its wall time, the pipeline's own stage timings (from the
   JSON) and the rest (start-up: imports, loading, warm-up, graph capture); with --cprofile, once
   more under cProfile;
3. starts `bilingual-qa serve` on the same checkpoints, asks twice to warm it (the second batch of
   a shape captures the translator's graphs), then times `bilingual-qa ask --server` processes for
   a Japanese question with a --server-tokens answer (`--raw`: random weights then run to the limit).

    python benchmarks/cold_start.py                   # published shapes, on the GPU (~2 minutes)
    python benchmarks/cold_start.py --bytecode as-is  # the environment's own bytecode settings
    python benchmarks/cold_start.py --tiny            # smoke test on the CPU

"Caches warm" includes Python's bytecode cache: pip writes every installed module's .pyc, so a user's
second process reads compiled modules. An environment with PYTHONDONTWRITEBYTECODE set and packages
shipped without .pyc (the GPU image this project is measured on: torch and sympy have no
__pycache__) compiles them from source in every process, which alone costs seconds. By default
(`--bytecode cache`) the measured processes keep their bytecode under ROOT/pycache
(PYTHONPYCACHEPREFIX, PYTHONDONTWRITEBYTECODE unset), filled by a first process; `--bytecode as-is`
leaves the environment alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ask_end_to_end import QUESTION, build  # noqa: E402 - beside this file

HEAVY = ("torch", "transformers", "transformers.modeling_utils", "torch.distributed.tensor", "torch._dynamo", "sympy",
         "sklearn", "httpx")


def cli(*args: str, python_flags: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, *python_flags, "-m", "pipeline", *args]


def model_args(paths: dict[str, Path]) -> list[str]:
    return ["--llm", str(paths["llm"]), "--ja-en", str(paths["ja_en"]), "--en-ja", str(paths["en_ja"])]


def run(command: list[str]) -> tuple[str, float, str]:
    began = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])}... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout, wall, proc.stderr


def imports(stderr: str) -> list[tuple[int, str, float]]:
    """(depth, module, cumulative seconds) of every line of `python -X importtime` output."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.removeprefix("import time:").split("|")
        rows.append(((len(name) - len(name.lstrip()) - 1) // 2, name.strip(), int(cumulative) / 1e6))
    return rows


def slowest_imports(rows, top: int) -> list[tuple[float, str]]:
    """The slowest imports at the top two levels (a top-level package, or what one imported)."""
    return sorted(((seconds, name) for depth, name, seconds in rows if depth <= 1), reverse=True)[:top]


def chain(rows, module: str) -> str | None:
    """`module <- its importer <- ...` up to the top level, with cumulative seconds; None if not imported."""
    for index, (depth, name, seconds) in enumerate(rows):
        if name == module:
            links, level = [f"{name} {seconds:.2f} s"], depth
            for up_depth, up_name, up_seconds in rows[index + 1:]:  # importers are printed after
                if up_depth < level:
                    links.append(f"{up_name} {up_seconds:.2f} s")
                    level = up_depth
                    if level == 0:
                        break
            return " <- ".join(links)
    return None


def measure_help(runs: int) -> dict:
    walls = [run(cli("--help"))[1] for _ in range(runs)]
    _, _, stderr = run(cli("--help", python_flags=("-X", "importtime")))
    loaded = {name for _, name, _ in imports(stderr)}
    return {"median_s": statistics.median(walls), "min_s": min(walls),
            "imports": [name for name in HEAVY if name in loaded]}


def bytecode_cache(mode: str, root: Path) -> str:
    """Set the measured processes' bytecode settings (see the module docstring); a line saying which."""
    was = {name: os.environ.get(name) for name in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    if mode == "cache":
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    now = {name: os.environ.get(name) for name in was}
    return f"bytecode: {mode} (environment had {was}; the measured processes run with {now})"


def measure_ask(paths: dict[str, Path], tokens: int, top: int, profile: Path | None) -> dict:
    """The first process fills the caches, the second (with -X importtime) says where the imports go;
    the next is the figure, a fourth gives the timeline of its status lines; with `profile`, one more under cProfile (where the rest goes)."""
    command = ["ask", QUESTION, "--format", "json", *model_args(paths), "--max-new-tokens", str(tokens)]
    _, first, _ = run(cli(*command))
    _, _, stderr = run(cli(*command, python_flags=("-X", "importtime")))
    rows = imports(stderr)
    stdout, wall, _ = run(cli(*command))
    figures = {"first_s": first, "wall_s": wall, "timeline": timeline(cli(*command)), "stages": json.loads(stdout).get("timings", {}),
               "slowest_imports": slowest_imports(rows, top), "heavy": {name: chain(rows, name) for name in HEAVY}}
    if profile is not None:
        _, figures["profiled_s"], _ = run([sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "pipeline",
                                           *command])
    return figures


def timeline(command: list[str]) -> list[tuple[float, str]]:
    """When each line of the process's stderr (its status lines) and its end came, in seconds from
    its start: where a cold process's wall time goes, without instrumenting it."""
    began = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1)
    lines = [(round(time.perf_counter() - began, 3), line.rstrip()) for line in proc.stderr]
    proc.wait()
    return lines + [(round(time.perf_counter() - began, 3), f"(exit {proc.returncode})")]


def print_profile(profile: Path, top: int) -> None:
    import pstats

    stats = pstats.Stats(str(profile))
    print(f"\nslowest functions of the cold ask (cProfile, cumulative), top {top}:")
    stats.sort_stats("cumulative").print_stats("pipeline/|safetensors|modeling_utils|from_pretrained|cuda", top)
    print(f"by own time, top {top}:")
    stats.sort_stats("tottime").print_stats(top)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_server(paths: dict[str, Path], tokens: int, runs: int, log: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    began = time.perf_counter()
    with open(log, "w") as server_log:
        server = subprocess.Popen(cli("serve", "--port", str(port), *model_args(paths)), stdout=server_log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(url, server, timeout=300)
        ready = time.perf_counter() - began
        command = cli("ask", QUESTION, "--server", url, "--format", "json", "--raw", "--max-new-tokens", str(tokens))
        for _ in range(2):  # the first batch of a shape runs eagerly, the second captures its graphs
            run(command)
        walls, results = [], []
        for _ in range(runs):
            stdout, wall, _ = run(command)
            walls.append(wall)
            results.append(json.loads(stdout))
        _, help_wall, _ = run(cli("ask", "--help"))
        return {"ready_s": ready, "median_s": statistics.median(walls), "walls_s": walls,
                "generated_tokens": [r["generated_tokens"] for r in results],
                "server_timings": results[-1]["timings"], "ask_help_s": help_wall}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def _wait_ready(url: str, server: subprocess.Popen, timeout: float) -> None:
    from pipeline.serve.ready import ServerNotReady, wait_until_ready

    try:
        wait_until_ready(url, process=server, timeout=timeout, every=0.2)
    except ServerNotReady as error:
        raise SystemExit(str(error)) from None


def device_name() -> tuple[str, str, str]:
    import torch  # the benchmark's own process; the processes it measures import what they import

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(), torch.__version__, "cuda"
    return platform.processor() or "CPU", torch.__version__, "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoints (a CPU smoke test)")
    parser.add_argument("--answer-tokens", type=int, default=64, help="new tokens of the cold ask")
    parser.add_argument("--server-tokens", type=int, default=200, help="new tokens of each ask --server")
    parser.add_argument("--server-runs", type=int, default=3)
    parser.add_argument("--help-runs", type=int, default=10)
    parser.add_argument("--no-server", action="store_true", help="skip the server part")
    parser.add_argument("--root", default=None, help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--cprofile", default=None, metavar="PATH", help="also profile a cold ask into PATH")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--bytecode", choices=("cache", "as-is"), default="cache",
                        help="the measured processes' Python bytecode cache (see above)")
    args = parser.parse_args()
    name, torch_version, device = device_name()
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: {name}; "
          f"torch {torch_version}; python {platform.python_version()}; command: {' '.join(sys.argv)}", flush=True)
    root = Path(args.root or tempfile.mkdtemp(prefix="cold-start-"))
    print(bytecode_cache(args.bytecode, root), flush=True)
    paths = build(root, args.tiny, device)
    figures = {"help": measure_help(args.help_runs)}
    print(f"\n--help: median {figures['help']['median_s']:.3f} s, min {figures['help']['min_s']:.3f} s over "
          f"{args.help_runs} processes; heavy imports: {figures['help']['imports'] or 'none'}", flush=True)
    profile = Path(args.cprofile) if args.cprofile else None
    try:
        ask = figures["ask"] = measure_ask(paths, args.answer_tokens, args.top, profile)
    except SystemExit as failure:  # the server part still runs
        print(f"cold ask failed: {failure}", flush=True)
        ask = None
    if ask is not None:
        report_ask(ask, args, profile)
    if not args.no_server:
        try:
            served = figures["server"] = measure_server(paths, args.server_tokens, args.server_runs,
                                                        root / "serve.log")
        except SystemExit as failure:
            print(f"ask --server failed: {failure}; the server's log: {root / 'serve.log'}", flush=True)
        else:
            print(f"\nask --server (Japanese question, --raw --max-new-tokens {args.server_tokens}): median "
                  f"{served['median_s']:.3f} s wall over {args.server_runs} processes "
                  f"{['%.3f' % w for w in served['walls_s']]}; generated tokens {served['generated_tokens']}; "
                  f"the server's stages {served['server_timings']}; server ready after {served['ready_s']:.1f} s; "
                  f"`ask --help` {served['ask_help_s']:.3f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, ensure_ascii=False))


def report_ask(ask: dict, args, profile: Path | None) -> None:
    staged = sum(seconds for stage, seconds in ask["stages"].items() if stage != "total")
    print(f"\ncold ask (--max-new-tokens {args.answer_tokens}): {ask['wall_s']:.2f} s wall (the first process, "
          f"filling the caches: {ask['first_s']:.1f} s); stages {staged:.2f} s; "
          f"the rest (imports, loading, warm-up) {ask['wall_s'] - staged:.2f} s", flush=True)
    print("| stage | s |\n|---|---|")
    for stage, seconds in ask["stages"].items():
        print(f"| {stage} | {seconds:.3f} |")
    print("\ntimeline of a fourth process (seconds from its start when each stderr line came):")
    for seconds, line in ask["timeline"]:
        print(f"  {seconds:6.2f} s  {line[:110]}")
    print(f"\nslowest imports (cumulative, -X importtime, the second process), top {args.top}:")
    for seconds, module in ask["slowest_imports"]:
        print(f"  {seconds:6.2f} s  {module}")
    print("heavy modules on the ask path (who imported them):")
    for module, links in ask["heavy"].items():
        print(f"  {module}: {links or 'not imported'}")
    if profile is not None:
        print(f"(the same process under cProfile: {ask['profiled_s']:.1f} s)")
        print_profile(profile, args.top)


if __name__ == "__main__":
    main()
