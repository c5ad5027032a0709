"""The `bilingual-qa` command: thin wrappers over the Python API.

Every error a user can cause ends as one line on stderr and exit code 2, never a traceback; output
is written only once it is complete.
"""

from __future__ import annotations

import functools
import sys

import click

from .answer import ENGINE_CHOICES
from .detect import detect_language, require_supported
from .errors import BilingualQAError, EmptyInputError
from .generation import GenerationSettings
from .mt_backend import BACKEND_CHOICES
from .qa import BilingualQA, check_question
from .render import FORMATS

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
@user_errors
def ask(question, fmt, llm, ja_en, en_ja, device, dtype, mt_backend, beams, engine, max_new_tokens,
        temperature, top_p, seed, source_lang):
    """Answer QUESTION (or stdin) and show it in English and Japanese."""
    question = read_question(question)
    forced = validate_language(question, source_lang)
    qa = BilingualQA.from_pretrained(llm, ja_en, en_ja, device=device, dtype=dtype, engine=engine,
                                     mt_backend=mt_backend, beams=beams)
    result = qa.ask(question, source_lang=forced, settings=settings_from(max_new_tokens, temperature, top_p, seed))
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
