"""The `bilingual-qa` command: thin wrappers over the Python API.

Every error a user can cause ends as one line on stderr and exit code 2, never a traceback; output
is written only once it is complete.
"""

from __future__ import annotations

import functools
import sys

import click

from pipeline.llm.answerer import ENGINE_CHOICES
from pipeline.text.detect import detect_language, require_supported
from pipeline.errors import BilingualQAError, EmptyInputError
from pipeline.llm.engine import GenerationSettings
from pipeline.mt.backends import BACKEND_CHOICES
from pipeline.qa import BilingualQA, check_question
from pipeline.text.render import FORMATS
from pipeline.mt.translator import DEFAULT_BATCH_TOKENS

EXIT_USER_ERROR = 2


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
        click.option("--ja-en", envvar="BILINGUAL_QA_JA_EN", default=None,
                     help="Japanese->English MarianMT model: hub id or local directory."),
        click.option("--en-ja", envvar="BILINGUAL_QA_EN_JA", default=None,
                     help="English->Japanese MarianMT model: hub id or local directory."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--dtype", default="auto", show_default=True,
                     help="auto (float16 on CUDA, float32 on CPU), float16, bfloat16 or float32."),
        click.option("--mt-backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
                     help="Translation backend."),
        click.option("--beams", type=click.IntRange(1, 16), default=None,
                     help="Translation beam width [default: each model's own, 4-6 for opus-mt].")
    ]
    for option in reversed(options):
        command = option(command)
    return command


def generation_options(command):
    options = [
        click.option("--engine", type=click.Choice(ENGINE_CHOICES), default="auto", show_default=True,
                     help="phi-2 generation engine (auto: fast on CUDA, else transformers)."),
        click.option("--max-new-tokens", type=click.IntRange(1, 2000), default=256, show_default=True),
        click.option("--temperature", type=click.FloatRange(0.0), default=0.0, show_default=True,
                     help="0 is greedy; above 0 samples."),
        click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True),
        click.option("--seed", type=int, default=None, help="Makes sampling reproducible."),
        click.option("--source-lang", type=click.Choice(["auto", "ja", "en"]), default="auto", show_default=True,
                     help="Skip detection and take the question as this language."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def job_options(prefix: str, holds: str):
    """Options of a batch job over a file (`translate`, `ask --batch`); `prefix` starts each help."""
    def lead(text: str) -> str:
        return prefix + text

    options = [
        click.option("--field", default=None, help=lead(f"JSONL field holding the {holds} [default: text].")),
        click.option("--column", default=None, help=lead(f"CSV/TSV column holding the {holds} [default: text].")),
        click.option("--errors", "errors_path", type=click.Path(dir_okay=False), default=None,
                     help=lead("Bad rows file [default: OUTPUT.errors.jsonl].")),
        click.option("--restart", is_flag=True, help=lead("Start over, overwriting the output.")),
        click.option("--quiet", "-q", is_flag=True, help=lead("No progress and no summary on stderr.")),
    ]

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command
    return apply


def read_question(question: str | None) -> str:
    """The question from the argument, or from stdin when it is absent or '-'."""
    if question is None or question == "-":
        data = sys.stdin.buffer.read()
        try:
            question = data.decode("utf-8")
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


def settings_from(max_new_tokens, temperature, top_p, seed) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bilingual-qa")
def main() -> None:
    """Ask phi-2 in Japanese or English; get the question and answer in both languages."""


@main.command()
@click.argument("question", required=False)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True)
@click.option("--llm", envvar="BILINGUAL_QA_LLM", default=None,
              help="phi-2-family model: hub id or local directory [default: microsoft/phi-2].")
@model_options
@generation_options
@click.option("--batch", "batch_path", type=click.Path(dir_okay=False), default=None,
              help="Answer every question of this .txt/.jsonl/.csv/.tsv file (no QUESTION) into --output.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="With --batch: the answers, one JSON object per question (.jsonl).")
@job_options("With --batch: ", "question")
@click.option("--stream", is_flag=True, help="Show the English answer as phi-2 writes it (--format text).")
@user_errors
def ask(question, fmt, llm, ja_en, en_ja, device, dtype, mt_backend, beams, engine, max_new_tokens,
        temperature, top_p, seed, source_lang, batch_path, output, field, column, errors_path, restart, quiet,
        stream):
    """Answer QUESTION (or stdin) and show it in English and Japanese; with --batch FILE, answer every
    question of FILE into --output (JSON lines), exactly once and resumable."""
    if batch_path is not None:
        return ask_batch_file(question, batch_path, output, field, column, errors_path, restart, quiet,
                              dict(llm=llm, ja_en=ja_en, en_ja=en_ja, device=device, dtype=dtype, engine=engine,
                                   mt_backend=mt_backend, beams=beams),
                              settings_from(max_new_tokens, temperature, top_p, seed), source_lang)
    if output or field or column or errors_path or restart or quiet:
        fail("--output, --field, --column, --errors, --restart and --quiet go with --batch")
    if stream and fmt != "text":
        fail("--stream goes with --format text")
    question = read_question(question)
    forced = validate_language(question, source_lang)
    qa = BilingualQA.from_pretrained(llm, ja_en, en_ja, device=device, dtype=dtype, engine=engine,
                                     mt_backend=mt_backend, beams=beams)
    settings = settings_from(max_new_tokens, temperature, top_p, seed)
    if stream:
        for piece in qa.stream_text(question, source_lang=forced, settings=settings):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        return
    result = qa.ask(question, source_lang=forced, settings=settings)
    click.echo(result.render(fmt), nl=False)


@main.command()
@click.argument("question", required=False)
@click.option("--llm", "llms", multiple=True, required=True,
              help="A phi-2-family model (hub id or directory); give it twice or more.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True)
@model_options
@generation_options
@user_errors
def compare(question, llms, fmt, ja_en, en_ja, device, dtype, mt_backend, beams, engine, max_new_tokens,
            temperature, top_p, seed, source_lang):
    """The same QUESTION through several models (e.g. phi-2 and a fine-tune), answers paired."""
    question = read_question(question)
    forced = validate_language(question, source_lang)
    qa = BilingualQA.from_pretrained(llms[0], ja_en, en_ja, device=device, dtype=dtype, engine=engine,
                                     mt_backend=mt_backend, beams=beams)
    results = qa.compare(question, list(llms), source_lang=forced, dtype=dtype, engine=engine,
                         settings=settings_from(max_new_tokens, temperature, top_p, seed))
    click.echo(render_comparison(results, fmt), nl=False)


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Output file, of the input's type; resumed if a run of the same job stopped.")
@click.option("--to", "target", type=click.Choice(["en", "ja"]), required=True, help="Target language.")
@click.option("--from", "source", type=click.Choice(["auto", "ja", "en"]), default="auto", show_default=True,
              help="Source language; auto detects per row and copies rows already in the target language.")
@model_options
@click.option("--batch-tokens", type=click.IntRange(16), default=DEFAULT_BATCH_TOKENS, show_default=True,
              help="Token budget of one translation batch (padded).")
@click.option("--chunk-rows", type=click.IntRange(1), default=512, show_default=True,
              help="Rows per committed chunk: a crash costs at most this much work.")
@job_options("", "text")
@user_errors
def translate(input_path, output, target, source, ja_en, en_ja, device, dtype, mt_backend, beams, batch_tokens,
              chunk_rows, field, column, errors_path, restart, quiet):
    """Translate every row of INPUT (.txt, .jsonl, .csv, .tsv) exactly once; resumable after a crash."""
    from pipeline.jobs import runner as jobs
    from pipeline.qa import model_names
    from pipeline.mt.translator import Translator

    names = model_names(ja_en=ja_en, en_ja=en_ja)
    model, option = (names["ja_en"], "--ja-en") if target == "en" else (names["en_ja"], "--en-ja")
    options = {"model": model, "beams": beams, "batch_tokens": batch_tokens, "mt_backend": mt_backend, "dtype": dtype}

    def load() -> Translator:  # only the model this direction needs, and only if there is work
        return Translator.from_pretrained(model, device=device, dtype=dtype, backend=mt_backend, target_lang=target,
                                          num_beams=beams, batch_tokens=batch_tokens, option=option)

    summary = jobs.translate_file(input_path, output, to=target, load_translator=load, options=options,
                                  source_lang=source, field=jobs.field_for(input_path, field, column),
                                  errors=errors_path, restart=restart, quiet=quiet, chunk_rows=chunk_rows)
    if not quiet:
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
                   settings: GenerationSettings, source_lang: str) -> None:
    """`ask --batch`: every question of a file, answered in batches, exactly once and resumable."""
    from pipeline.jobs import runner as jobs
    from pipeline.qa import model_names

    if question is not None:
        fail("give QUESTION or --batch FILE, not both")
    if output is None:
        fail("--batch needs --output ANSWERS.jsonl")
    models = model_names(load["llm"], load["ja_en"], load["en_ja"])
    options = {"models": models, **{key: load[key] for key in ("dtype", "engine", "mt_backend", "beams")}}

    def load_qa() -> BilingualQA:
        return BilingualQA.from_pretrained(models["llm"], models["ja_en"], models["en_ja"], device=load["device"],
                                           dtype=load["dtype"], engine=load["engine"],
                                           mt_backend=load["mt_backend"], beams=load["beams"])

    summary = jobs.ask_file(batch_path, output, load_qa=load_qa, options=options,
                            source_lang=None if source_lang == "auto" else source_lang, settings=settings,
                            field=jobs.field_for(batch_path, field, column), errors=errors_path,
                            restart=restart, quiet=quiet)
    if not quiet:
        click.echo(f"bilingual-qa: {summary.describe()}", err=True)


def render_comparison(results, fmt: str) -> str:
    if fmt == "json":
        import json

        return json.dumps([r.to_dict() for r in results], ensure_ascii=False, indent=2) + "\n"
    heading = "## {}\n\n" if fmt == "markdown" else "=== {} ===\n\n"
    return "\n".join(heading.format(r.models["llm"]) + r.render(fmt) for r in results)


def run() -> None:
    """Console entry point: click's own usage errors also become one line and exit code 2."""
    try:
        main.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("bilingual-qa: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        fail(error.format_message().replace("\n", " "))
    except KeyboardInterrupt:
        click.echo("bilingual-qa: interrupted", err=True)
        sys.exit(130)
