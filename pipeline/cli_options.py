"""The options the commands share (models, generation, batch jobs), the checks that run before any
model loads, and --quiet for a job: what `cli.py`'s commands are made of."""

from __future__ import annotations

import math
import re
from pathlib import Path

import click

from pipeline.errors import DeviceError, JobError, ModelLoadError
from pipeline.spec import (BACKEND_CHOICES, DEFAULT_EN_JA, DEFAULT_JA_EN, ENGINE_CHOICES, MAX_SEED,
                           GenerationSettings)

# Options that choose how models run here; with --server the server's operator chose them.
LOCAL_ONLY = {"ja_en": "--ja-en", "en_ja": "--en-ja", "device": "--device", "dtype": "--dtype",
              "mt_backend": "--mt-backend", "engine": "--engine", "base": "--base", "workers": "--workers",
              "cluster": "--cluster", "memory": "--memory", "batch_tokens": "--batch-tokens"}


class FiniteFloatRange(click.FloatRange):
    """A float range that also refuses nan and inf (which pass every comparison or bound)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class GpuMemory(click.ParamType):
    """A share of the card (above 0, at most 1) or an amount of bytes: 16GiB, 40GB, 2e10."""

    name = "FRACTION|SIZE"
    UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
             "tib": 2**40}

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        match = re.fullmatch(r"\s*(\d*\.?\d+(?:e\d+)?)\s*([a-z]*)\s*", value.lower())
        if not match or match.group(2) not in self.UNITS:
            self.fail(f"{value!r} is neither a share of the card (0.9) nor an amount (16GiB, 40GB).", param, ctx)
        amount = float(match.group(1)) * self.UNITS[match.group(2)]
        if not 0 < amount <= 1 and amount < 2**30:
            self.fail(f"{value!r} is no share of the card (above 0, at most 1) and under 1 GiB.", param, ctx)
        return amount


def explicit_llm(llm: str | None) -> str | None:
    """--llm given on the command line picks one of the server's models; BILINGUAL_QA_LLM does not
    (it names what to load here)."""
    return llm if given_on_command_line({"llm": "--llm"}) else None


def model_options(command):
    """Options shared by every command that loads models."""
    options = [
        click.option("--ja-en", envvar="BILINGUAL_QA_JA_EN", default=None, show_envvar=True,
                     help=f"Japanese->English MarianMT model: hub id or local directory [default: {DEFAULT_JA_EN}]."),
        click.option("--en-ja", envvar="BILINGUAL_QA_EN_JA", default=None, show_envvar=True,
                     help=f"English->Japanese MarianMT model: hub id or local directory [default: {DEFAULT_EN_JA}]."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--dtype", default="auto", show_default=True,
                     help="auto (bfloat16 on GPUs of compute capability 8.0+, float16 with fp32 attention scores below, "
                          "float32 on CPU), float16, bfloat16 or float32."),
        click.option("--mt-backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
                     help="Translation backend."),
        click.option("--beams", type=click.IntRange(1, 16), default=None,
                     help="Translation beam width [default: each model's own, 4-6 for opus-mt].")
    ]
    return with_options(options)(command)


base_option = click.option(
    "--base", envvar="BILINGUAL_QA_BASE", default=None,
    help="Base model of a LoRA adapter --llm (hub id or directory) [default: the adapter's base_model_name_or_path].")


def generation_options(command):
    options = [
        click.option("--engine", type=click.Choice(ENGINE_CHOICES), default="auto", show_default=True,
                     help="phi-2 generation engine (auto: fast on CUDA, else transformers)."),
        click.option("--max-new-tokens", type=click.IntRange(1, 2000), default=256, show_default=True),
        click.option("--temperature", type=FiniteFloatRange(0.0, 100.0), default=0.0, show_default=True,
                     help="0 is greedy; above 0 samples."),
        click.option("--top-p", type=FiniteFloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True),
        click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None,
                     help=f"Makes sampling reproducible (0 to {MAX_SEED})."),
        click.option("--source-lang", type=click.Choice(["auto", "ja", "en"]), default="auto", show_default=True,
                     help="Skip detection and take the question as this language."),
        click.option("--raw", is_flag=True,
                     help="phi-2's whole output, untrimmed (echoed question, invented follow-ups), translated."),
    ]
    return with_options(options)(command)


def job_options(prefix: str, holds: str, chunk_rows: int):
    """Options of a batch job over a file (`translate`, `ask --batch`); `prefix` starts each help."""
    def lead(text: str) -> str:
        return prefix + text

    options = [
        click.option("--field", default=None, help=lead(f"JSONL field holding the {holds} [default: text].")),
        click.option("--column", default=None, help=lead(f"CSV/TSV column holding the {holds} [default: text].")),
        click.option("--errors", "errors_path", type=click.Path(dir_okay=False), default=None,
                     help=lead("Bad rows file [default: OUTPUT.errors.jsonl].")),
        click.option("--restart", is_flag=True, help=lead("Start over, overwriting the output.")),
        click.option("--chunk-rows", type=click.IntRange(1), default=chunk_rows, show_default=True,
                     help=lead("Rows per committed chunk: a crash costs at most this much work.")),
        click.option("--workers", default="1", show_default=True, metavar="N|auto",
                     help=lead("Run the chunks on N local Dask workers, one per GPU (auto: one per GPU, "
                               "1 without a GPU); needs the 'distributed' extra.")),
        click.option("--cluster", metavar="ADDRESS", default=None,
                     help=lead("Run the chunks on the workers of this running Dask scheduler "
                               "(tcp://HOST:8786) instead of a local cluster.")),
        click.option("--quiet", "-q", is_flag=True,
                     help="Only errors on stderr (and a job's one-line summary): no loading lines, bars or warnings."),
        click.option("--memory", type=click.Path(dir_okay=False), default=None,
                     help=lead("Translation memory (SQLite file): sentences translated before, by any job, "
                               "are reused.")),
    ]
    return with_options(options)


def with_options(options: list):
    """A decorator applying click options in the order listed (as they show in --help)."""
    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command
    return apply


def server_options(concurrency: bool):
    """--server (ask, compare, translate) and, for the commands that run jobs, --concurrency."""
    options = [click.option(
        "--server", envvar="BILINGUAL_QA_SERVER", metavar="URL", default=None, show_envvar=True,
        help="Send the work to this running `bilingual-qa serve` (http://HOST:PORT) instead of loading models "
             "here; the key comes from BILINGUAL_QA_API_KEY.")]
    if concurrency:
        options.append(click.option(
            "--concurrency", type=click.IntRange(1, 1024), default=None,
            help="With --server and a file: rows in flight at once [default: the server's --max-batch]."))
    return with_options(options)


def given_on_command_line(names: dict[str, str]) -> list[str]:
    """Which of these parameters of the running command the user typed (not defaults, not the environment)."""
    ctx = click.get_current_context()
    return [name for name in names if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]


def field_for(input: str | Path, field: str | None, column: str | None) -> str:
    """The JSONL field or CSV column that holds the text, refusing the option of the other format."""
    from pipeline.jobs.files import input_format

    fmt = input_format(Path(input))
    if fmt in ("csv", "tsv") and field is not None:
        raise JobError("--field is for .jsonl input; use --column for .csv/.tsv")
    if fmt == "jsonl" and column is not None:
        raise JobError("--column is for .csv/.tsv input; use --field for .jsonl")
    if fmt == "txt" and (field or column) is not None:
        raise JobError("a .txt input holds one text per line: --field and --column are for .jsonl and .csv")
    return field or column or "text"


def check_workers(workers: str, cluster: str | None, device: str) -> None:
    """Refuse what cannot work on workers before anything loads."""
    if cluster is not None and workers != "1":
        raise JobError("--cluster runs on that cluster's workers: leave out --workers")
    if (workers != "1" or cluster) and device.startswith("cuda:"):
        raise JobError(f"--device {device}: each worker has its own GPU; use --device auto or cuda with --workers")


def check_before_loading(device: str, engine: str | None = None, mt_backend: str = "auto") -> None:
    """The checks that need no model, run before any model loads: the device, and engines or
    backends that cannot serve it (each would otherwise fail only after minutes of loading). The
    device needs torch to be asked about, so every check that does not comes before this one."""
    from pipeline.loading import resolve_device

    resolved = resolve_device(device)
    if engine == "fast" and resolved.type != "cuda":
        raise DeviceError(f"--engine fast needs a CUDA device, not {resolved.type}; use --engine transformers")
    if mt_backend == "fast" and resolved.type != "cuda":
        raise DeviceError(f"--mt-backend fast needs a CUDA device, not {resolved.type}; use --mt-backend auto")
    if mt_backend == "ctranslate2":
        from pipeline.mt.ctranslate2 import ctranslate2_available

        if resolved.type != "cpu":
            raise DeviceError("--mt-backend ctranslate2 runs on the CPU only here; use --mt-backend fast on CUDA")
        if not ctranslate2_available():
            raise ModelLoadError("--mt-backend ctranslate2 needs the optional extra: pip install 'bilingual-qa[cpu-fast]'")


def settings_from(max_new_tokens, temperature, top_p, seed, raw=False) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              raw=raw)
