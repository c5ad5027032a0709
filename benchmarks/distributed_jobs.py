"""Batch jobs on one GPU and on two: `translate` of 100,000 lines and `ask --batch` of 2,000 questions.

Builds random-weight checkpoints at the published shapes (phi-2: 2.78B parameters; opus-mt and
FuguMT: d_model 512, 6+6 layers, 60716-row vocabulary) in the published formats, starts a local
Dask cluster of N workers (one per GPU, as `--workers N` does), and runs each job through it. Each
cluster first runs a small warm-up job of the same options, so its workers hold their models (and
have captured their CUDA graphs) before the clock starts: the figures are steady-state rows per
second of the whole job (reading, chunking, sending, decoding, committing with fsync), not model
loading. The outputs of 1 and 2 workers are compared byte for byte.

Random weights never write end-of-text, so every translation runs to its length bound (2 x source
tokens + 16) and every answer to --max-new-tokens (64 here, not the CLI's 256, to keep the run
under 8 minutes on two H100s; the translators use --beams 1, the engines `auto` (fast on CUDA)).

    python benchmarks/distributed_jobs.py                 # published shapes, workers 1 then 2
    python benchmarks/distributed_jobs.py --tiny          # smoke test on the CPU (tiny shapes)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Workers inherit these: no loading lines or load bars from each worker between the figures.
for name, value in (("BILINGUAL_QA_QUIET", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                    ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
    os.environ.setdefault(name, value)

SENTENCES = [
    "金利が上がると、人や企業にとって借り入れの費用が高くなります。", "円安は日本の輸出品を海外で安くします。",
    "東京の株式市場は午後に少し下がりました。", "予算は収入、支出、そして残った残高を示します。",
    "ローンとリースの違いを説明してください。", "中央銀行は物価の安定を目指して政策金利を決めます。",
    "分散投資はリスクを減らすための基本的な考え方です。", "インフレとは何ですか、そしてなぜ重要なのですか？",
]
QUESTIONS = ["インフレとは何ですか？", "What is a bond?", "金利が上がるとどうなりますか？", "Why do stocks fall?",
             "円安は輸出にどう影響しますか？", "What does a central bank do?", "分散投資とは何ですか？"]


def build(root: Path, tiny: bool) -> dict[str, str]:
    import torch

    from pipeline.checkpoints import build_tiny_marian, build_tiny_phi2

    device = "cuda" if torch.cuda.is_available() else "cpu"
    phi = {} if tiny else dict(hidden=2560, layers=32, heads=32, vocab_rows=51200)
    marian = {} if tiny else dict(d_model=512, layers=6, ffn=2048, heads=8, vocab_size=60716)
    paths = {"llm": root / "phi-2", "ja_en": root / "opus-mt-ja-en", "en_ja": root / "fugumt-en-ja"}
    if not (paths["llm"] / "config.json").exists():
        build_tiny_phi2(paths["llm"], dtype=torch.float32 if tiny else torch.float16, device=device, **phi)
        build_tiny_marian(paths["ja_en"], "ja", "en", **marian)
        build_tiny_marian(paths["en_ja"], "en", "ja", **marian)
    return {name: str(path) for name, path in paths.items()}


def write_lines(path: Path, count: int, pool: list[str], most: int = 1) -> Path:
    """`count` lines of 1 to `most` items of `pool`: rows of different lengths, as real files have."""
    lines = ("".join(pool[(i + k) % len(pool)] for k in range(1 + i % most)) for i in range(count))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def load_translator(name: str):
    from pipeline import Translator

    return Translator.from_pretrained(name, target_lang="en", num_beams=1, option="--ja-en")


def load_qa(paths: dict[str, str]):
    from pipeline import BilingualQA

    return BilingualQA.from_pretrained(paths["llm"], paths["ja_en"], paths["en_ja"], beams=1)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def run_jobs(workers: int, paths: dict[str, str], inputs: dict[str, Path], work: Path, max_new_tokens: int):
    """Rows/s of the translate and the ask job on a local cluster of `workers` workers."""
    from distributed import Client

    from pipeline import GenerationSettings
    from pipeline.jobs import workers as jobs
    from pipeline.jobs.cluster import local_cluster

    translate = functools.partial(jobs.translate_file, to="en", source_lang="ja", quiet=True,
                                  load_translator=functools.partial(load_translator, paths["ja_en"]),
                                  options={"model": paths["ja_en"], "beams": 1})
    ask = functools.partial(jobs.ask_file, load_qa=functools.partial(load_qa, paths), quiet=True,
                            options={"models": paths}, settings=GenerationSettings(max_new_tokens=max_new_tokens))
    results = {}
    started = time.perf_counter()
    with local_cluster(workers) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers, timeout=300)
        address = cluster.scheduler_address
        for name, job, suffix in (("translate", translate, ".txt"), ("ask", ask, ".jsonl")):
            # Same options as the measured job, so the workers keep the models it loads.
            job(inputs[f"{name}_warmup"], work / f"{name}-warmup-{workers}{suffix}", cluster=address)
            output = work / f"{name}-{workers}{suffix}"
            start = time.perf_counter()
            summary = job(inputs[name], output, cluster=address)
            seconds = time.perf_counter() - start
            results[name] = (summary.rows, seconds, digest(output))
            print(f"  workers={workers} {name}: {summary.rows:,} rows in {seconds:.1f} s "
                  f"({summary.rows / seconds:,.1f} rows/s)", flush=True)
    print(f"  workers={workers}: {time.perf_counter() - started:.0f} s with cluster start and warm-up", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="lines of the translate job")
    parser.add_argument("--questions", type=int, default=2_000, help="questions of the ask --batch job")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length (random weights run to it)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="cluster sizes to measure")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few rows: a CPU smoke test")
    parser.add_argument("--work", type=Path, default=None, help="where checkpoints and files go [a temp dir]")
    args = parser.parse_args()

    import torch

    if args.tiny:
        args.rows, args.questions, args.max_new_tokens = min(args.rows, 600), min(args.questions, 40), 4
    work = args.work or Path(tempfile.mkdtemp(prefix="distributed-jobs-"))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "CPU"
    print(f"# {datetime.date.today()}  {torch.cuda.device_count()} x {device}  torch {torch.__version__}  "
          f"python {platform.python_version()}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    start = time.perf_counter()
    paths = build(work / "models", args.tiny)
    print(f"checkpoints ready in {time.perf_counter() - start:.0f} s", flush=True)
    # One sentence a line (of eight lengths): 100,000 lines on one GPU fit the 8-minute budget.
    inputs = {"translate": write_lines(work / "lines.txt", args.rows, SENTENCES),
              "translate_warmup": write_lines(work / "lines-warmup.txt", 4 * 512, SENTENCES),
              "ask": write_lines(work / "questions.txt", args.questions, QUESTIONS),
              "ask_warmup": write_lines(work / "questions-warmup.txt", 4 * 128, QUESTIONS)}
    table = {workers: run_jobs(workers, paths, inputs, work, args.max_new_tokens) for workers in args.workers}

    base = table[args.workers[0]]
    print(f"\n| job | rows | workers | seconds | rows/s | speedup | output sha256 |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, label in (("translate", "translate"), ("ask", f"ask --batch ({args.max_new_tokens} new tokens)")):
        for workers, results in table.items():
            rows, seconds, sha = results[name]
            speedup = base[name][1] / seconds
            print(f"| {label} | {rows:,} | {workers} | {seconds:.1f} | {rows / seconds:,.1f} | {speedup:.2f}x | {sha} |")
    same = all(len({results[name][2] for results in table.values()}) == 1 for name in ("translate", "ask"))
    print(f"\noutputs byte-identical across worker counts: {'yes' if same else 'NO'}; "
          f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
