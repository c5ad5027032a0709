"""The `bilingual-qa` command: thin wrappers over the Python API.

Every error a user can cause ends as one line on stderr and exit code 2, never a traceback; output
is written only once it is complete.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import sys
import warnings
from pathlib import Path

import click

from pipeline.llm.answerer import ENGINE_CHOICES
from pipeline.text.detect import detect_language, require_supported
from pipeline.errors import BilingualQAError, DeviceError, EmptyInputError, JobError, ModelLoadError
from pipeline.jobs import workers as jobs
from pipeline.jobs.files import input_format
from pipeline.llm.engine import GenerationSettings
from pipeline.loading import locate_model, quiet_libraries, resolve_device
from pipeline.mt.backends import BACKEND_CHOICES
from pipeline.mt.memory import SQLiteStore
from pipeline.qa import BilingualQA, check_question, model_names
from pipeline.text.controls import strip_controls
from pipeline.text.render import FORMATS
from pipeline.mt.translator import DEFAULT_BATCH_TOKENS, Translator

EXIT_USER_ERROR = 2
MAX_SEED = 2**32 - 1  # what every engine's generator takes
# Errors of the machine, not of our code, that a user fixes: a full disk, a read-only directory.
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR,
                  errno.EISDIR, errno.ENOENT}
ENV_EPILOG = (
    "\b\nEnvironment:\n"
    "  BILINGUAL_QA_LLM, BILINGUAL_QA_JA_EN, BILINGUAL_QA_EN_JA  default models (hub id or directory)\n"
    "  BILINGUAL_QA_QUIET=1   no status lines (as --quiet)\n"
    "  HF_HUB_OFFLINE=1       never reach the hub; HF_HOME: where hub models are cached\n"
    "  XDG_CACHE_HOME         CTranslate2 conversions go to $XDG_CACHE_HOME/bilingual-qa/ct2"
)


class FiniteFloatRange(click.FloatRange):
    """A float range that also refuses nan and inf (which pass every comparison or bound)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def fail(message: str) -> None:
    click.echo(f"bilingual-qa: error: {message}", err=True)
    sys.exit(EXIT_USER_ERROR)


def user_errors(command):
    """Turn our own errors into one line and exit code 2."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BilingualQAError as error:
            fail(str(error))
    return wrapper


def model_options(command):
    """Options shared by every command that loads models."""
    options = [
        click.option("--ja-en", envvar="BILINGUAL_QA_JA_EN", default=None, show_envvar=True,
                     help="Japanese->English MarianMT model: hub id or local directory."),
        click.option("--en-ja", envvar="BILINGUAL_QA_EN_JA", default=None, show_envvar=True,
                     help="English->Japanese MarianMT model: hub id or local directory."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--dtype", default="auto", show_default=True,
                     help="auto (bfloat16 on GPUs of compute capability 8.0+, float16 with fp32 attention scores below, "
                          "float32 on CPU), float16, bfloat16 or float32."),
        click.option("--mt-backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
                     help="Translation backend."),
        click.option("--beams", type=click.IntRange(1, 16), default=None,
                     help="Translation beam width [default: each model's own, 4-6 for opus-mt].")
    ]
    for option in reversed(options):
        command = option(command)
    return command


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
    for option in reversed(options):
        command = option(command)
    return command


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
    ]

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command
    return apply


def field_for(input: str | Path, field: str | None, column: str | None) -> str:
    """The JSONL field or CSV column that holds the text, refusing the option of the other format."""
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
        fail("--cluster runs on that cluster's workers: leave out --workers")
    if (workers != "1" or cluster) and device.startswith("cuda:"):
        fail(f"--device {device}: each worker has its own GPU; use --device auto or cuda with --workers")


QUIET_ENVIRONMENT = {"BILINGUAL_QA_QUIET": "1", "TRANSFORMERS_VERBOSITY": "error",
                     "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


@contextlib.contextmanager
def quiet_job(quiet: bool):
    """--quiet: no loading lines, notes, warnings or transformers' bars, here and in the workers a
    local cluster starts (they inherit the environment); errors and the summary still show."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    saved = {name: os.environ.get(name) for name in QUIET_ENVIRONMENT}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    os.environ.update(QUIET_ENVIRONMENT)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def read_question(question: str | None) -> str:
    """The question from the argument, or from stdin when it is absent or '-'."""
    if question is None or question == "-":
        if sys.stdin.isatty():
            if question is None:
                fail('no question: give it as an argument (bilingual-qa ask "...") or on stdin'
                     ' (echo "..." | bilingual-qa ask), or pass - to type it here')
            click.echo("bilingual-qa: type the question, then Ctrl-D", err=True)
        data = sys.stdin.buffer.read()
        try:
            question = data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not text
        except UnicodeDecodeError as error:
            raise EmptyInputError(f"the question is not valid UTF-8 (byte {error.start})") from None
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that were not UTF-8 arrive as lone surrogates
        raise EmptyInputError("the question is not valid UTF-8") from None
    return check_question(question)


def validate_language(question: str, source_lang: str) -> str | None:
    """Refuse an unsupported language before any model is loaded."""
    if source_lang != "auto":
        return source_lang
    require_supported(detect_language(question))
    return None


def check_before_loading(device: str, engine: str | None = None, mt_backend: str = "auto") -> None:
    """The checks that need no model, run before any model loads: the device, and engines or
    backends that cannot serve it (each would otherwise fail only after minutes of loading)."""
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True,
             epilog=ENV_EPILOG)
@click.version_option(package_name="bilingual-qa")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Ask phi-2 in Japanese or English; get the question and answer in both languages.

    `bilingual-qa COMMAND --help` shows each command's options."""
    if ctx.invoked_subcommand is None:  # bare `bilingual-qa`: the help, as asked for, exit 0
        click.echo(ctx.get_help())


@main.command(epilog=ENV_EPILOG)
@click.argument("question", required=False)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True)
@click.option("--llm", envvar="BILINGUAL_QA_LLM", default=None, show_envvar=True,
              help="phi-2-family model: hub id or local directory [default: microsoft/phi-2].")
@base_option
@model_options
@generation_options
@click.option("--batch", "batch_path", type=click.Path(dir_okay=False), default=None,
              help="Answer every question of this .txt/.jsonl/.csv/.tsv file (no QUESTION) into --output.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="With --batch: the answers, one JSON object per question (.jsonl).")
@job_options("With --batch: ", "question", jobs.ASK_CHUNK_ROWS)
@click.option("--memory", type=click.Path(dir_okay=False), default=None,
              help="With --batch: translation memory (SQLite file): sentences translated before, by any job, are reused.")
@click.option("--stream", is_flag=True, help="Show the English answer as phi-2 writes it (--format text).")
@user_errors
def ask(question, fmt, llm, base, ja_en, en_ja, device, dtype, mt_backend, beams, engine, max_new_tokens,
        temperature, top_p, seed, source_lang, raw, batch_path, output, field, column, errors_path, restart,
        chunk_rows, workers, cluster, quiet, memory, stream):
    """Answer QUESTION (or stdin) and show it in English and Japanese; with --batch FILE, answer every
    question of FILE into --output (JSON lines), exactly once and resumable."""
    given = {name for name in ("fmt", "chunk_rows", "workers")
             if click.get_current_context().get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    quiet_libraries(quiet)
    check_before_loading(device, engine, mt_backend)
    if batch_path is not None:
        if stream or "fmt" in given:
            fail("--batch writes one JSON object per question into --output: --format and --stream are "
                 "for a single QUESTION")
        return ask_batch_file(question, batch_path, output, field, column, errors_path, restart, quiet,
                              dict(llm=llm, base=base, ja_en=ja_en, en_ja=en_ja, device=device, dtype=dtype,
                                   engine=engine, mt_backend=mt_backend, beams=beams, memory=memory),
                              settings_from(max_new_tokens, temperature, top_p, seed, raw), source_lang,
                              chunk_rows, workers, cluster)
    if output or field or column or errors_path or restart or cluster or memory or given - {"fmt"}:
        fail("--output, --field, --column, --errors, --restart, --chunk-rows, --workers, --cluster "
             "and --memory go with --batch")
    if stream and fmt != "text":
        fail("--stream goes with --format text")
    question = read_question(question)
    forced = validate_language(question, source_lang)
    qa = BilingualQA.from_pretrained(llm, ja_en, en_ja, device=device, dtype=dtype, engine=engine,
                                     mt_backend=mt_backend, beams=beams, base=base)
    settings = settings_from(max_new_tokens, temperature, top_p, seed, raw)
    if stream:
        for piece in qa.stream_text(question, source_lang=forced, settings=settings):
            click.echo(strip_controls(piece), nl=False)
            sys.stdout.flush()
        return
    result = qa.ask(question, source_lang=forced, settings=settings)
    click.echo(result.render(fmt), nl=False)


@main.command(epilog=ENV_EPILOG)
@click.argument("question", required=False)
@click.option("--llm", "llms", multiple=True, required=True,
              help="A phi-2-family model or LoRA adapter (hub id or directory); give it twice or more.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True)
@base_option
@model_options
@generation_options
@click.option("--quiet", "-q", is_flag=True, help="Errors only on stderr: no loading lines, progress bars or warnings.")
@user_errors
def compare(question, llms, fmt, base, ja_en, en_ja, device, dtype, mt_backend, beams, engine, max_new_tokens,
            temperature, top_p, seed, source_lang, raw, quiet):
    """The same QUESTION through several models (e.g. phi-2 and a fine-tune), answers paired; a base
    and its LoRA adapters share one copy of the base weights."""
    from pipeline.llm.models import resolve_llm

    quiet_libraries(quiet)
    check_before_loading(device, engine, mt_backend)
    question = read_question(question)
    forced = validate_language(question, source_lang)
    for name in llms:  # every model checked before the first loads: none fails after an answer
        resolve_llm(name, base)
    qa = BilingualQA.from_pretrained(llms[0], ja_en, en_ja, device=device, dtype=dtype, engine=engine,
                                     mt_backend=mt_backend, beams=beams, base=base)
    results = qa.compare(question, list(llms), source_lang=forced, dtype=dtype, engine=engine, base=base,
                         settings=settings_from(max_new_tokens, temperature, top_p, seed, raw))
    click.echo(render_comparison(results, fmt), nl=False)


@main.command(epilog=ENV_EPILOG)
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Output file, of the input's type; resumed if a run of the same job stopped.")
@click.option("--to", "target", type=click.Choice(["en", "ja"]), required=True, help="Target language.")
@click.option("--from", "source", type=click.Choice(["auto", "ja", "en"]), default="auto", show_default=True,
              help="Source language; auto detects per row and copies rows already in the target language.")
@model_options
@click.option("--batch-tokens", type=click.IntRange(16), default=DEFAULT_BATCH_TOKENS, show_default=True,
              help="Token budget of one translation batch (padded).")
@job_options("", "text", jobs.TRANSLATE_CHUNK_ROWS)
@click.option("--memory", type=click.Path(dir_okay=False), default=None,
              help="Translation memory (SQLite file): sentences translated before, by any job, are reused.")
@user_errors
def translate(input_path, output, target, source, ja_en, en_ja, device, dtype, mt_backend, beams, batch_tokens,
              chunk_rows, workers, cluster, field, column, errors_path, restart, quiet, memory):
    """Translate every row of INPUT (.txt, .jsonl, .csv, .tsv) exactly once; resumable after a crash."""
    check_workers(workers, cluster, device)
    quiet_libraries(quiet)
    check_before_loading(device, None, mt_backend)
    names = model_names(ja_en=ja_en, en_ja=en_ja)
    model, option = (names["ja_en"], "--ja-en") if target == "en" else (names["en_ja"], "--en-ja")
    options = {"model": model, "beams": beams, "batch_tokens": batch_tokens, "mt_backend": mt_backend, "dtype": dtype}
    store = SQLiteStore(memory) if memory else None   # a bad memory file is refused before any work
    # Only the model this direction needs, and only if there is work; a recipe (not a closure) so
    # that a cluster's workers can be sent it (the store reopens its file in each process).
    load = functools.partial(Translator.from_pretrained, model, device=device, dtype=dtype, backend=mt_backend,
                             target_lang=target, num_beams=beams, batch_tokens=batch_tokens, option=option,
                             memory=store)
    with quiet_job(quiet):
        summary = jobs.translate_file(input_path, output, to=target, load_translator=load, options=options,
                                      source_lang=source, field=field_for(input_path, field, column),
                                      errors=errors_path, restart=restart, quiet=quiet, chunk_rows=chunk_rows,
                                      workers=workers, cluster=cluster)
    click.echo(f"bilingual-qa: {summary.describe()}", err=True)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--llm", "llms", multiple=True, envvar="BILINGUAL_QA_LLM",
              help="A phi-2-family model (hub id or directory); repeat to serve several, the first is the default.")
@model_options
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), default="auto", show_default=True,
              help="phi-2 generation engine (auto: fast on CUDA, else transformers).")
@click.option("--api-key", envvar="BILINGUAL_QA_API_KEY", default=None,
              help="Key every API request must carry (bearer token or api_key field) [env: BILINGUAL_QA_API_KEY].")
@click.option("--max-queue", type=click.IntRange(1), default=256, show_default=True,
              help="Requests in flight before new ones get 503 and Retry-After.")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=64, show_default=True,
              help="Most questions decoded together.")
@click.option("--max-body", type=click.IntRange(1), default=1_000_000, show_default=True,
              help="Largest request body in bytes (413 above).")
@user_errors
def serve(host, port, llms, ja_en, en_ja, device, dtype, mt_backend, beams, engine, api_key, max_queue, max_batch,
          max_body):
    """Serve the models over HTTP: a web page, /v1/ask, LibreTranslate- and OpenAI-compatible APIs."""
    from pipeline import serve as serve_room  # the serve extra is imported only by this command

    if not serve_room.is_loopback(host) and not api_key:
        fail(f"refusing to listen on {host} without an API key: pass --api-key or set BILINGUAL_QA_API_KEY")
    if missing := serve_room.missing_requirements():
        fail(f"the server needs {', '.join(missing)}: pip install 'bilingual-qa[serve]'")
    from pipeline.serve.app import ServerConfig
    from pipeline.serve.models import LoadOptions
    from pipeline.serve.server import run_server

    options = LoadOptions(llms=list(llms), ja_en=ja_en, en_ja=en_ja, device=device, dtype=dtype, engine=engine,
                          mt_backend=mt_backend, beams=beams, max_rows=max_batch)
    run_server(options, host=host, port=port,
               config=ServerConfig(api_key=api_key or None, max_body=max_body, max_queue=max_queue))


def ask_batch_file(question, batch_path, output, field, column, errors_path, restart, quiet, load: dict,
                   settings: GenerationSettings, source_lang: str, chunk_rows: int, workers: str,
                   cluster: str | None) -> None:
    """`ask --batch`: every question of a file, answered in batches, exactly once and resumable."""
    if question is not None:
        fail("give QUESTION or --batch FILE, not both")
    if output is None:
        fail("--batch needs --output ANSWERS.jsonl")
    check_workers(workers, cluster, load["device"])
    models = model_names(load["llm"], load["ja_en"], load["en_ja"])
    options = {"models": models, **{key: load[key] for key in ("dtype", "engine", "mt_backend", "beams")}}
    if load["base"]:
        options["base"] = load["base"]
    store = SQLiteStore(load["memory"]) if load["memory"] else None   # refused before any work if bad
    load_qa = functools.partial(BilingualQA.from_pretrained, models["llm"], models["ja_en"], models["en_ja"],
                                device=load["device"], dtype=load["dtype"], engine=load["engine"],
                                mt_backend=load["mt_backend"], beams=load["beams"], memory=store,
                                base=load["base"])
    with quiet_job(quiet):
        summary = jobs.ask_file(batch_path, output, load_qa=load_qa, options=options,
                                source_lang=None if source_lang == "auto" else source_lang, settings=settings,
                                field=field_for(batch_path, field, column), errors=errors_path,
                                restart=restart, quiet=quiet, chunk_rows=chunk_rows, workers=workers,
                                cluster=cluster)
    click.echo(f"bilingual-qa: {summary.describe()}", err=True)


@main.command()
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True, help="As for ask: what would run with it.")
@click.option("--engine", type=click.Choice(["auto", "fast", "transformers"]), default="auto", show_default=True)
@user_errors
def doctor(fmt, device, dtype, engine):
    """What this machine has and what will run here (dtype, engine, kernels, graphs, PDL), and why."""
    import json

    from pipeline import doctor as diagnosis

    info = diagnosis.report(device, dtype, engine)
    click.echo(json.dumps(info, indent=2) if fmt == "json" else diagnosis.render(info), nl=fmt == "json")


def render_comparison(results, fmt: str) -> str:
    if fmt == "json":
        import json

        return json.dumps([r.to_dict() for r in results], ensure_ascii=False, indent=2) + "\n"
    heading = "## {}\n\n" if fmt == "markdown" else "=== {} ===\n\n"

    def label(models: dict) -> str:  # an adapter is named with its base
        return f"{models['llm']} (LoRA adapter on {models['llm_base']})" if "llm_base" in models else models["llm"]
    return "\n".join(heading.format(label(r.models)) + r.render(fmt) for r in results)


def run() -> None:
    """Console entry point: click's own usage errors also become one line and exit code 2."""
    try:
        main.main(standalone_mode=False)
        sys.stdout.flush()  # here, so a full disk under stdout is reported, not lost at exit
    except OSError as error:
        if error.errno == errno.EPIPE:  # `| head`: the reader has all it wanted
            _discard_stdout()
            sys.exit(1)
        if error.errno not in USER_OS_ERRORS:
            raise
        _discard_stdout()
        full = error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        fail(f"cannot write {error.filename or 'the output'}: {error.strerror or error}" if full
             else f"{error.filename or 'a file'}: {error.strerror or error}")
    except click.exceptions.Abort:
        click.echo("bilingual-qa: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        fail(" ".join(error.format_message().split()))
    except KeyboardInterrupt:
        click.echo("bilingual-qa: interrupted", err=True)
        sys.exit(130)


def _discard_stdout() -> None:
    # What stdout still buffers would fail again at exit, with Python's own multi-line complaint.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
