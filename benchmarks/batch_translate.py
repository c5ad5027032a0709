"""Rows per second of a file translation job: our job runner against plain loops over transformers.

    PYTHONPATH=. python benchmarks/batch_translate.py [--device cuda] [--rows 10000] [--beams 1,6]

The input is a generated .txt file of Japanese rows (one sentence each, 1 to 5 clauses of the tiny
corpus joined by "、", so lengths vary as in real files). The model has the published
opus-mt-ja-en shape (d_model 512, 6+6 layers, ffn 2048, 8 heads, vocab 60716, random weights); its
tokenizer is the tiny sentencepiece one of pipeline/checkpoints.py, its vocab.json padded with filler
pieces to the published 60716 ids, so the output projection costs what the published one does (the
tiny sentencepiece splits Japanese into more pieces than the published one would).

A random model does not know when to stop, so </s> is suppressed (final_logits_bias -1e4) and every
system decodes exactly --new-tokens tokens per row (our Translator's per-row bound, 2n+16, is set to
that constant here); the systems then do the same work, and their outputs can be compared token for
token. This understates what sorting by length gains with a real model, whose output lengths follow
the input's.

With --document, the document case instead: the same --paragraphs sentences as a .txt job and as
a Markdown file of as many paragraphs (one sentence each; every 7th with a bold clause, every 50th
after a heading-free code block, so the parser and the rebuild do real work), both through the job
runner with the same translator (memory off), --repeats times each, alternating; the table gives
the median sentences/s of each and their ratio. The document job's output is checked to be the
document rebuilt from the .txt job's lines, byte for byte (the same translations).

    PYTHONPATH=. python benchmarks/batch_translate.py --document --device cuda [--paragraphs 2000]
    PYTHONPATH=. python benchmarks/batch_translate.py --document --tiny   # a CPU check of the script

Systems:
- job runner: `Translator.translate_file` (the `bilingual-qa translate` job: read, chunk, sort by length,
  token-budget batches, write, fsync and commit per chunk), with each --backends backend. Its
  translation memory is off, so it decodes every row as the loops do (the generated rows repeat:
  one-clause rows come from a small corpus); with --memory, one more row per backend measures the
  job with its default in-process memory, which translates each distinct sentence once.
- one row at a time / batches of --batch-size in input order: what transformers'
  `pipeline("translation")` did (tokenizer with padding -> generate -> batch_decode). That pipeline was
  removed in transformers 5 (KeyError "The task translation has been removed"), so the loops call the
  same steps directly. They run on the first --single-rows / --baseline-rows rows only (rows/s is a
  rate; the table says how many rows each measured).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch


import pipeline.mt.translator as translate_module
from pipeline import Translator
from pipeline.checkpoints import JAPANESE_CORPUS, build_tiny_marian

VOCAB = 60716


def build_checkpoint(directory: Path) -> Path:
    """A MarianMT checkpoint of the published shape (vocabulary padded to 60716 ids) whose rows all
    decode to the length bound: end-of-sentence is held off by a -1e4 logit bias."""
    from transformers import MarianMTModel

    path = build_tiny_marian(directory / "opus-mt-ja-en-shape", "ja", "en", d_model=512, layers=6,
                             ffn=2048, heads=8, vocab_size=VOCAB)
    model = MarianMTModel.from_pretrained(path).eval()
    with torch.no_grad():
        model.final_logits_bias[0, model.config.eos_token_id] = -1e4
    model.save_pretrained(path)
    return path


def japanese_rows(count: int, seed: int = 0) -> list[str]:
    """One sentence per row: 1-5 clauses joined by "、" (not a sentence end, so no row is split)."""
    clauses = [line.rstrip("。？") for line in JAPANESE_CORPUS if line.count("。") + line.count("？") <= 1]
    rng = random.Random(seed)
    return ["、".join(rng.choice(clauses) for _ in range(rng.choice([1, 1, 2, 2, 3, 5]))) + "。"
            for _ in range(count)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class NoMemory:
    """A memory store that never holds anything: nothing is remembered from one call to the next
    (the Translator still decodes a sentence repeated within one call once)."""

    def get_many(self, context, sources):
        return {}

    def put_many(self, context, description, pairs):
        pass


def job_runner(checkpoint: Path, source: Path, work: Path, device, backend: str, beams: int, rows: list[str],
               memory: bool = False):
    translator = Translator.from_pretrained(str(checkpoint), device=device, backend=backend, num_beams=beams)
    translator.translate(rows[:256])  # warm-up: CUDA context, graphs, kernels
    if memory:
        translator.use_memory(None)   # empty again: the warm-up's sentences are not free hits
    else:
        translator.use_memory(NoMemory())
    output = work / f"job-{backend}-{beams}.txt"
    sync(device)
    started = time.perf_counter()
    summary = translator.translate_file(source, output, source_lang="ja", quiet=True, restart=True)
    sync(device)
    seconds = time.perf_counter() - started
    assert summary.done == len(rows), summary
    return seconds, output.read_text(encoding="utf-8").splitlines(), translator.backend.name, translator.memory


def markdown_of(rows: list[str]) -> str:
    """One paragraph per sentence; some with a bold clause, and a code block now and then."""
    parts = []
    for i, row in enumerate(rows):
        if i % 50 == 49:
            parts.append("```python\nprint('kept as it is')\n```")
        first, comma, rest = row.partition("、")
        parts.append(f"**{first}**{comma}{rest}" if i % 7 == 3 and rest else row)
    return "\n\n".join(parts) + "\n"


def document_case(checkpoint: Path, work: Path, device, backend: str, rows: list[str], repeats: int):
    """Median seconds of the .txt job and of the Markdown job over the same sentences."""
    from pipeline import translate_document
    from pipeline.documents.markdown import MarkdownDocument

    text_file, markdown_file = work / "sentences.txt", work / "sentences.md"
    text_file.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    markdown_file.write_text(markdown_of(rows), encoding="utf-8")
    assert [s.text for s in MarkdownDocument(markdown_file.read_text(encoding="utf-8")).segments] == rows
    translator = Translator.from_pretrained(str(checkpoint), device=device, backend=backend, num_beams=1)
    translator.translate(rows[:256])  # warm-up: CUDA context, graphs, kernels
    translator.use_memory(NoMemory())
    times = {"txt": [], "md": []}
    for _ in range(repeats):
        for kind in ("txt", "md"):
            sync(device)
            started = time.perf_counter()
            if kind == "txt":
                summary = translator.translate_file(text_file, work / "out.txt", source_lang="ja", quiet=True,
                                                    restart=True)
            else:
                summary = translate_document(markdown_file, work / "out.md", translator, restart=True)
            sync(device)
            times[kind].append(time.perf_counter() - started)
            assert summary.done == len(rows), summary
    # The document rebuilt from the .txt job's lines must be the document job's output, byte for byte.
    lines = (work / "out.txt").read_text(encoding="utf-8").splitlines()
    expected = MarkdownDocument(markdown_file.read_text(encoding="utf-8")).rebuild(lines, "en")
    same = expected == (work / "out.md").read_bytes()
    median = {kind: sorted(values)[len(values) // 2] for kind, values in times.items()}
    median.update(parse_and_rebuild(markdown_file.read_bytes(), lines, repeats))
    return median, same, translator.backend.name


def parse_and_rebuild(data: bytes, translations: list[str], repeats: int) -> dict:
    """Median seconds of the document job's own work: parsing the file, rebuilding it."""
    from pipeline import documents

    parse, rebuild = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        document = documents.parse(data, "md")
        parse.append(time.perf_counter() - started)
        started = time.perf_counter()
        documents.rebuild(document, translations, "en")
        rebuild.append(time.perf_counter() - started)
    return {"parse": sorted(parse)[len(parse) // 2], "rebuild": sorted(rebuild)[len(rebuild) // 2]}


def run_document_case(args, device, work: Path) -> None:
    checkpoint = (build_tiny_marian(work / "tiny", "ja", "en") if args.tiny else build_checkpoint(work))
    rows = japanese_rows(args.paragraphs)
    median, same, backend = document_case(checkpoint, work, device, args.backends.split(",")[0], rows, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    shape = "tiny test checkpoint" if args.tiny else "opus-mt-ja-en shape (random weights)"
    print(f"\n## batch_translate --document: {len(rows):,} sentences as .txt and as Markdown paragraphs, {shape}, "
          f"{args.new_tokens} tokens decoded per sentence, --mt-backend {args.backends.split(',')[0]} ({backend})")
    print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; device {name}; "
          f"torch {torch.__version__}; median of {args.repeats} runs each")
    print(f"command: PYTHONPATH=. python benchmarks/batch_translate.py {' '.join(sys.argv[1:])}\n")
    print("| job | sentences | seconds | sentences/s |")
    print("|---|---|---|---|")
    for kind, label in (("txt", ".txt job"), ("md", "Markdown document job")):
        print(f"| {label} | {len(rows):,} | {median[kind]:.2f} | {len(rows) / median[kind]:,.1f} |")
    print(f"\nOf the document job's time: parsing {median['parse']:.3f} s, rebuilding {median['rebuild']:.3f} s.")
    ratio = median["txt"] / median["md"]
    print(f"\nMarkdown / .txt sentences/s: {ratio:.3f} (target: at least 0.85); "
          f"the document job's output equals the document rebuilt from the .txt job's lines: {same}")


def baseline_model(checkpoint: Path, device):
    from transformers import MarianMTModel, MarianTokenizer

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = MarianMTModel.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    return model, MarianTokenizer.from_pretrained(checkpoint)


@torch.inference_mode()
def pipeline_style(model, tokenizer, rows: list[str], batch_size: int, beams: int, new_tokens: int, device):
    """The steps of transformers 4's TranslationPipeline over consecutive batches, in input order."""
    outputs = []
    for start in range(0, len(rows), batch_size):
        encoded = tokenizer(rows[start:start + batch_size], return_tensors="pt", padding=True, truncation=True)
        generated = model.generate(**encoded.to(device), num_beams=beams, do_sample=False, max_length=None,
                                   max_new_tokens=new_tokens + 1)  # +1: generate forces </s> into the last
        outputs += [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return outputs


def time_baseline(model, tokenizer, rows, batch_size, beams, new_tokens, device, work: Path):
    pipeline_style(model, tokenizer, rows[:min(len(rows), 2 * batch_size)], batch_size, beams, new_tokens, device)
    sync(device)
    started = time.perf_counter()
    outputs = pipeline_style(model, tokenizer, rows, batch_size, beams, new_tokens, device)
    (work / f"baseline-{batch_size}-{beams}.txt").write_text("".join(o + "\n" for o in outputs), encoding="utf-8")
    sync(device)
    return time.perf_counter() - started, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=10_000, help="rows of the generated file (job runner)")
    parser.add_argument("--baseline-rows", type=int, default=None, help="rows the batched loop runs [--rows]")
    parser.add_argument("--single-rows", type=int, default=200, help="rows the one-at-a-time loop runs")
    parser.add_argument("--batch-size", type=int, default=32, help="the pipeline-style loop's batch_size")
    parser.add_argument("--beams", default="1", help="comma-separated beam widths")
    parser.add_argument("--backends", default="auto", help="comma-separated --mt-backend values for the job")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per row by every system")
    parser.add_argument("--work", default=None, help="scratch directory [a temporary one]")
    parser.add_argument("--memory", action="store_true",
                        help="also time the job with its in-process translation memory (repeats translated once)")
    parser.add_argument("--document", action="store_true", help="the document case (see the module docstring)")
    parser.add_argument("--paragraphs", type=int, default=2000, help="sentences of the document case")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each job in the document case")
    parser.add_argument("--tiny", action="store_true", help="document case on the tiny checkpoint (a CPU check)")
    args = parser.parse_args()
    device = torch.device(args.device)
    work = Path(args.work or tempfile.mkdtemp(prefix="batch_translate-"))
    work.mkdir(parents=True, exist_ok=True)
    translate_module.output_bound = lambda source_tokens: args.new_tokens  # see the module docstring
    if args.document:
        return run_document_case(args, device, work)

    checkpoint = build_checkpoint(work)
    rows = japanese_rows(args.rows)
    source = work / "input.txt"
    source.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    print(f"{len(rows):,} rows, {source.stat().st_size:,} bytes, {min(map(len, rows))}-{max(map(len, rows))} "
          f"characters per row; scratch {work}", flush=True)

    model, tokenizer = baseline_model(checkpoint, device)
    table = []
    for beams in [int(b) for b in args.beams.split(",")]:
        single_rows = rows[:args.single_rows]
        seconds, single = time_baseline(model, tokenizer, single_rows, 1, beams, args.new_tokens, device, work)
        table.append(("loop, one row at a time", beams, len(single_rows), seconds, "-"))
        print(table[-1], flush=True)
        batch_rows = rows[:args.baseline_rows or len(rows)]
        seconds, batched = time_baseline(model, tokenizer, batch_rows, args.batch_size, beams, args.new_tokens,
                                         device, work)
        table.append((f"loop, batch_size={args.batch_size} in input order", beams, len(batch_rows), seconds,
                      agreement(batched, single)))
        print(table[-1], flush=True)
        for backend in args.backends.split(","):
            seconds, job, name, _ = job_runner(checkpoint, source, work, device, backend, beams, rows)
            table.append((f"job runner, --mt-backend {backend} ({name})", beams, len(rows), seconds,
                          agreement(job, single)))
            print(table[-1], flush=True)
            if args.memory:
                seconds, job, name, memory = job_runner(checkpoint, source, work, device, backend, beams, rows,
                                                        memory=True)
                table.append((f"job runner, --mt-backend {backend} ({name}), memory: {memory.misses:,} "
                              f"translated, {memory.hits:,} found", beams, len(rows), seconds,
                              agreement(job, single)))
                print(table[-1], flush=True)
    print_table(table, device, args)


def agreement(outputs: list[str], reference: list[str]) -> str:
    same = sum(a == b for a, b in zip(outputs, reference))
    return f"{same}/{min(len(outputs), len(reference))}"


def print_table(table, device, args) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n## batch_translate: {args.rows:,}-row Japanese .txt file, opus-mt-ja-en shape (random weights), "
          f"{args.new_tokens} tokens decoded per row")
    print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; device {name}; "
          f"torch {torch.__version__}; transformers {__import__('transformers').__version__}; "
          f"python {platform.python_version()}")
    print(f"command: PYTHONPATH=. python benchmarks/batch_translate.py {' '.join(sys.argv[1:])}\n")
    print("| system | beams | rows measured | seconds | rows/s | same text as one-at-a-time |")
    print("|---|---|---|---|---|---|")
    for system, beams, rows, seconds, same in table:
        print(f"| {system} | {beams} | {rows:,} | {seconds:,.1f} | {rows / seconds:,.1f} | {same} |")


if __name__ == "__main__":
    main()
