"""The `bilingual-qa` command: thin wrappers over the Python API.

Every error a user can cause ends as one line on stderr and exit code 2, never a traceback; output
is written only once it is complete.
"""

from __future__ import annotations

import errno
import functools
import os
import sys

import click

# Only what --help and the checks that need no model use is imported here: no torch, transformers or job
# room. The stages (and jobs) load inside the commands that run them (python -X importtime).
from pipeline.cli_options import (LOCAL_ONLY, GpuMemory, base_option, check_before_loading, check_workers,
                                  explicit_llm, field_for, generation_options, given_on_command_line, job_options,
                                  model_options, server_options, settings_from)
from pipeline.cli_finetune import finetune_command
from pipeline.cli_tiny_models import tiny_models
from pipeline.errors import BilingualQAError, EmptyInputError, ServerError
from pipeline.quick_exit import ends_quickly
from pipeline.quiet import quiet_libraries
from pipeline.spec import (ASK_CHUNK_ROWS, BATCHING_CHOICES, DEFAULT_BATCH_TOKENS, DIRECTION_ROLE, ENGINE_CHOICES,
                           MODEL_OPTION, TRANSLATE_CHUNK_ROWS, GenerationSettings, LoadSpec)
from pipeline.text.detect import detect_language, require_supported
from pipeline.text.question import check_question
from pipeline.text.render import FORMATS
from pipeline.documents import FORMAT_CHOICES as DOCUMENT_FORMATS, format_of as document_format

EXIT_USER_ERROR = 2
# Errors of the machine, not of our code, that a user fixes: a full disk, a read-only directory.
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR,
                  errno.EISDIR, errno.ENOENT}
ENV_EPILOG = (
    "\b\nEnvironment:\n"
    "  BILINGUAL_QA_LLM, BILINGUAL_QA_JA_EN, BILINGUAL_QA_EN_JA  default models (hub id or directory)\n"
    "  BILINGUAL_QA_BASE      base of a LoRA adapter --llm (as --base)\n"
    "  BILINGUAL_QA_API_KEY   the key serve requires of every API request (as --api-key)\n"
    "  BILINGUAL_QA_QUIET=1   no status lines (as --quiet)\n"
    "  BILINGUAL_QA_SERVER    a running `bilingual-qa serve` to send the work to (as --server URL);\n"
    "                         BILINGUAL_QA_API_KEY its key\n"
    "  HF_HUB_OFFLINE=1       never reach the hub; HF_HOME: where hub models are cached\n"
    "  XDG_CACHE_HOME         CTranslate2 conversions go to $XDG_CACHE_HOME/bilingual-qa/ct2"
)


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    click.echo(f"bilingual-qa: error: {message}", err=True)
    sys.exit(code)


def user_errors(command):
    """Turn our own errors into one line and exit code 2."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            # --quiet (and bars only on a terminal) for this command alone: every command passes here
            with quiet_libraries(kwargs.get("quiet", False)):
                return command(*args, **kwargs)
        except BilingualQAError as error:
            fail(str(error))
        except ServerError as error:  # --server: unreachable, or a refusal that is no row's fault
            fail(str(error), error.exit_code)
    return wrapper


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True,
             epilog=ENV_EPILOG, commands=[tiny_models, finetune_command(user_errors)])  # commands of their own modules
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
@job_options("With --batch: ", "question", ASK_CHUNK_ROWS)
@click.option("--stream", is_flag=True, help="Show the English answer as phi-2 writes it (--format text).")
@server_options(concurrency=True)
@user_errors
def ask(question, fmt, llm, base, ja_en, en_ja, device, dtype, mt_backend, beams, engine, max_new_tokens,
        temperature, top_p, seed, source_lang, raw, batch_path, output, field, column, errors_path, restart,
        chunk_rows, workers, cluster, quiet, memory, stream, server, concurrency):
    """Answer QUESTION (or stdin) and show it in English and Japanese; with --batch FILE, answer every
    question of FILE into --output (JSON lines), exactly once and resumable."""
    given = {name for name in ("fmt", "chunk_rows", "workers")
             if click.get_current_context().get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    settings = settings_from(max_new_tokens, temperature, top_p, seed, raw)
    if server:
        refuse_local_options("ask", server)
    if batch_path is not None:
        if stream or "fmt" in given:
            fail("--batch writes one JSON object per question into --output: --format and --stream are "
                 "for a single QUESTION")
        return ask_batch_file(question, batch_path, output, field, column, errors_path, restart, quiet,
                              dict(llm=llm, base=base, ja_en=ja_en, en_ja=en_ja, device=device, dtype=dtype,
                                   engine=engine, mt_backend=mt_backend, beams=beams, memory=memory),
                              settings, source_lang, chunk_rows, workers, cluster, server, concurrency)
    if output or field or column or errors_path or restart or cluster or memory or given - {"fmt"}:
        fail("--output, --field, --column, --errors, --restart, --chunk-rows, --workers, --cluster "
             "and --memory go with --batch")
    if concurrency:
        fail("--concurrency goes with --batch and --server: the rows of a file in flight at once")
    if stream and fmt != "text":
        fail("--stream goes with --format text")
    question = read_question(question)  # a bad question is refused before torch is even imported
    forced = validate_language(question, source_lang)
    if server:
        from pipeline.remote import commands as remote

        return remote.ask(server, question, fmt, stream, forced, settings, explicit_llm(llm), beams)
    check_before_loading(device, engine, mt_backend)
    from pipeline.qa import BilingualQA
    from pipeline.text.controls import strip_controls

    qa = BilingualQA.from_pretrained(llm, ja_en, en_ja, device=device, dtype=dtype, engine=engine,
                                     mt_backend=mt_backend, beams=beams, base=base, lean=True)
    if stream:
        for piece in qa.stream_text(question, source_lang=forced, settings=settings):
            click.echo(strip_controls(piece), nl=False)
            sys.stdout.flush()
        return
    result = qa.ask(question, source_lang=forced, settings=settings)
    click.echo(result.render(fmt), nl=False)


def refuse_local_options(command: str, server: str) -> None:
    """With --server the server's operator chose the models and how they run: an option that would
    choose them here is refused (from the environment, the model variables are simply not used)."""
    for name in given_on_command_line(LOCAL_ONLY):
        fail(f"{LOCAL_ONLY[name]} chooses how models run here; with --server {server} the server's own "
             f"options decide: leave it out (or drop --server to run {command} here)")


@main.command(epilog=ENV_EPILOG)
@click.argument("question", required=False)
@click.option("--llm", "llms", multiple=True, required=True,
              help="A phi-2-family model or LoRA adapter (hub id or directory); give it twice or more, or once"
                   " with a LoRA adapter to compare it with its base.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True)
@base_option
@model_options
@generation_options
@click.option("--quiet", "-q", is_flag=True, help="Errors only on stderr: no loading lines, progress bars or warnings.")
@server_options(concurrency=False)
@user_errors
def compare(question, llms, fmt, base, ja_en, en_ja, device, dtype, mt_backend, beams, engine, max_new_tokens,
            temperature, top_p, seed, source_lang, raw, quiet, server):
    """The same QUESTION through several models (e.g. phi-2 and a fine-tune), answers paired; a base
    and its LoRA adapters share one copy of the base weights."""
    settings = settings_from(max_new_tokens, temperature, top_p, seed, raw)
    if server:
        refuse_local_options("compare", server)
    question = read_question(question)
    forced = validate_language(question, source_lang)
    if server:
        from pipeline.remote import commands as remote

        return remote.compare(server, question, list(llms), fmt, forced, settings, beams)
    check_before_loading(device, engine, mt_backend)
    from pipeline.llm.models import compared_models
    from pipeline.qa import BilingualQA
    from pipeline.text.render import render_comparison

    llms = compared_models(llms, base)  # every model checked before the first loads
    qa = BilingualQA.from_pretrained(llms[0], ja_en, en_ja, device=device, dtype=dtype, engine=engine,
                                     mt_backend=mt_backend, beams=beams, base=base)
    results = qa.compare(question, list(llms), source_lang=forced, dtype=dtype, engine=engine, base=base,
                         settings=settings)
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
@job_options("", "text", TRANSLATE_CHUNK_ROWS)
@click.option("--format", "doc_format", type=click.Choice(DOCUMENT_FORMATS), default=None,
              help="Read INPUT as this document format, whatever its extension [default: by extension].")
@server_options(concurrency=True)
@user_errors
def translate(input_path, output, target, source, ja_en, en_ja, device, dtype, mt_backend, beams, batch_tokens,
              chunk_rows, workers, cluster, field, column, errors_path, restart, quiet, memory, doc_format, server,
              concurrency):
    """Translate every row of INPUT (.txt, .jsonl, .csv, .tsv) exactly once; resumable after a crash.
    A document (.md, .html, .srt, .vtt, .docx) is translated into the same format, keeping
    everything but the words."""
    if server:
        refuse_local_options("translate", server)
    elif concurrency:
        fail("--concurrency goes with --server")
    forced, doc_format = doc_format, document_format(input_path, doc_format)
    if doc_format is not None and (field or column):
        fail("--field and --column are for .jsonl and .csv/.tsv input, not for documents")
    from pipeline.jobs import workers as jobs
    if doc_format is None:
        field = field_for(input_path, field, column)
        jobs.check_translation_job(input_path, output, target, source, errors_path)  # before torch is imported
    if server:
        from pipeline.remote import commands as remote

        return remote.translate(server, input_path, output, target=target, source=source, beams=beams,
                                concurrency=concurrency, field=field, errors_path=errors_path, restart=restart,
                                quiet=quiet, chunk_rows=chunk_rows, report=summary_line, doc_format=forced)
    check_workers(workers, cluster, device)
    check_before_loading(device, None, mt_backend)
    from pipeline.mt.memory import SQLiteStore
    from pipeline.mt.translator import Translator

    spec = LoadSpec.resolve(ja_en=ja_en, en_ja=en_ja, device=device, dtype=dtype, mt_backend=mt_backend,
                            beams=beams, batch_tokens=batch_tokens)
    role = DIRECTION_ROLE[target]
    model, option = getattr(spec, role), MODEL_OPTION[role]
    store = SQLiteStore(memory) if memory else None   # a bad memory file is refused before any work
    # This direction's model only, loaded only if there is work: a recipe cluster workers can be sent (not a closure).
    load = functools.partial(Translator.from_pretrained, model, device=device, dtype=dtype, backend=mt_backend,
                             target_lang=target, num_beams=beams, batch_tokens=batch_tokens, option=option,
                             memory=store)
    if doc_format is not None:
        from pipeline.jobs.documents import translate_document_file

        summary = translate_document_file(input_path, output, to=target, load_translator=load,
                                          options=spec.fingerprint("translate", target), source_lang=source,
                                          fmt=forced, errors=errors_path, restart=restart, quiet=quiet,
                                          chunk_rows=chunk_rows, workers=workers, cluster=cluster)
        return summary_line(summary.describe())
    summary = jobs.translate_file(input_path, output, to=target, load_translator=load,
                                  options=spec.fingerprint("translate", target), source_lang=source, field=field,
                                  errors=errors_path, restart=restart, quiet=quiet, chunk_rows=chunk_rows,
                                  workers=workers, cluster=cluster)
    summary_line(summary.describe())


def summary_line(text: str) -> None:
    click.echo(f"bilingual-qa: {text}", err=True)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--llm", "llms", multiple=True, envvar="BILINGUAL_QA_LLM",
              help="A phi-2-family model or LoRA adapter (hub id or directory); repeat to serve several, the first "
                   "is the default. A base and its adapters share one copy of the base weights and one batch.")
@base_option
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
@click.option("--batching", type=click.Choice(BATCHING_CHOICES), default="auto", show_default=True,
              help="continuous: questions join the decoding batch at the next step; micro: each generate call "
                   "takes the questions waiting (auto: continuous on both engines).")
@click.option("--served-model-name", "served_names", multiple=True,
              help="The name clients use for each --llm, in order (default: a directory's name, or the hub id).")
@click.option("--char-limit", type=click.IntRange(1), default=200_000, show_default=True,
              help="Most characters of text in one request (400 above).")
@click.option("--batch-limit", type=click.IntRange(1), default=128, show_default=True,
              help="Most texts in one /translate request (400 above).")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="Another name the Host header may carry without a key (besides loopback and --host); '*': any.")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Another site whose pages may call the API (e.g. https://app.example; '*': any), with CORS headers.")
@click.option("--keep-alive-timeout", type=click.FloatRange(0.1), default=15.0, show_default=True,
              help="Seconds an idle keep-alive connection stays open.")
@click.option("--header-timeout", type=click.FloatRange(0.1), default=20.0, show_default=True,
              help="Seconds a connection has to send a request's head (after opening or a response).")
@click.option("--body-timeout", type=click.FloatRange(0.1), default=60.0, show_default=True,
              help="Seconds a request has to send its whole body after its head.")
@click.option("--max-connections", type=click.IntRange(1), default=512, show_default=True,
              help="Open connections beyond which new ones are closed (at the limit, requests get 503).")
@click.option("--gpu-memory", type=GpuMemory(), default="0.9", show_default=True, help="The share of the GPU (or "
              "bytes: 16GiB) this server may take; the answer cache gets what the models and working memory leave.")
@click.option("--shutdown-timeout", type=click.FloatRange(0), default=30.0, show_default=True,
              help="Seconds SIGTERM waits for requests in flight before it exits anyway.")
@user_errors
def serve(host, port, llms, base, ja_en, en_ja, device, dtype, mt_backend, beams, engine, api_key, max_queue,
          max_batch, max_body, batching, served_names, char_limit, batch_limit, allowed_hosts, cors_origins,
          keep_alive_timeout, header_timeout, body_timeout, max_connections, gpu_memory, shutdown_timeout):
    """Serve the models over HTTP: a web page, /v1/ask, LibreTranslate- and OpenAI-compatible APIs."""
    from pipeline import serve as serve_room  # the serve extra is imported only by this command

    api_key = api_key.strip() if api_key else None  # a blank key is no key
    if not serve_room.is_loopback(host) and not api_key:
        fail(f"refusing to listen on {host} without an API key: pass --api-key or set BILINGUAL_QA_API_KEY")
    if missing := serve_room.missing_requirements():
        fail(f"the server needs {', '.join(missing)}: pip install 'bilingual-qa[serve]'")
    if len(served_names) > max(1, len(set(llms))):
        fail(f"{len(served_names)} --served-model-name for {max(1, len(set(llms)))} --llm")
    from pipeline.serve.app import ServerConfig
    from pipeline.serve.models import LoadOptions
    from pipeline.serve.server import ConnectionLimits, run_server

    options = LoadOptions(llms=list(llms), ja_en=ja_en, en_ja=en_ja, device=device, dtype=dtype, engine=engine,
                          mt_backend=mt_backend, beams=beams, max_rows=max_batch, batching=batching,
                          served_names=list(served_names), base=base, gpu_memory=gpu_memory)
    limits = ConnectionLimits(keep_alive_timeout=keep_alive_timeout, header_timeout=header_timeout,
                              body_timeout=body_timeout, max_connections=max_connections,
                              shutdown_timeout=shutdown_timeout)
    run_server(options, host=host, port=port, limits=limits,
               config=ServerConfig(api_key=api_key, max_body=max_body, max_queue=max_queue, char_limit=char_limit,
                                   batch_limit=batch_limit, allowed_hosts=allowed_hosts, cors_origins=cors_origins))


def ask_batch_file(question, batch_path, output, field, column, errors_path, restart, quiet, load: dict,
                   settings: GenerationSettings, source_lang: str, chunk_rows: int, workers: str,
                   cluster: str | None, server: str | None, concurrency: int | None) -> None:
    """`ask --batch`: every question of a file, answered in batches, exactly once and resumable."""
    if question is not None:
        fail("give QUESTION or --batch FILE, not both")
    if output is None:
        fail("--batch needs --output ANSWERS.jsonl")
    if concurrency and not server:
        fail("--concurrency goes with --server")
    field = field_for(batch_path, field, column)
    forced = None if source_lang == "auto" else source_lang
    if server:
        from pipeline.remote import commands as remote

        return remote.ask_batch(server, batch_path, output, model=explicit_llm(load["llm"]), beams=load["beams"],
                                concurrency=concurrency, settings=settings, source_lang=forced, field=field,
                                errors_path=errors_path, restart=restart, quiet=quiet, chunk_rows=chunk_rows,
                                report=summary_line)
    check_workers(workers, cluster, load["device"])
    check_before_loading(load["device"], load["engine"], load["mt_backend"])
    from pipeline.jobs import workers as jobs
    from pipeline.mt.memory import SQLiteStore
    from pipeline.qa import BilingualQA

    spec = LoadSpec.resolve(**{key: value for key, value in load.items() if key != "memory"})
    store = SQLiteStore(load["memory"]) if load["memory"] else None   # refused before any work if bad
    load_qa = functools.partial(BilingualQA.from_pretrained, spec.llm, spec.ja_en, spec.en_ja, device=spec.device,
                                dtype=spec.dtype, engine=spec.engine, mt_backend=spec.mt_backend, beams=spec.beams,
                                memory=store, base=spec.base, lean=True)
    summary = jobs.ask_file(batch_path, output, load_qa=load_qa, options=spec.fingerprint("ask"),
                            source_lang=forced, settings=settings, field=field, errors=errors_path,
                            restart=restart, quiet=quiet, chunk_rows=chunk_rows, workers=workers, cluster=cluster)
    summary_line(summary.describe())


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


@ends_quickly  # a process that used the GPU skips the interpreter's teardown (quick_exit.py)
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
