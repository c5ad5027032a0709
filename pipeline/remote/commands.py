"""`ask`, `compare`, `ask --batch` and `translate` (rows or documents) with `--server URL`: the work goes to a running
`bilingual-qa serve`, and what is printed is what the in-process command prints (the same
renderers, the same stream layout, the same job runner and files). No torch is imported here.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

import click

from pipeline.errors import ServerError
from pipeline.remote.client import ServerClient
from pipeline.remote.stages import ask_fields
from pipeline.spec import GenerationSettings
from pipeline.text.render import render_comparison, render_stream
from pipeline.text.result import QAResult


def ask(url: str, question: str, fmt: str, stream: bool, source_lang: str | None, settings: GenerationSettings,
        model: str | None, beams: int | None) -> None:
    client = ServerClient(url, connections=1)
    fields = ask_fields(question, source_lang, settings, model, beams)
    try:
        if stream:
            return _stream(client, fields)
        click.echo(QAResult.from_dict(client.ask(fields)).render(fmt), nl=False)
    finally:
        client.close()


def _stream(client: ServerClient, fields: dict) -> None:
    """The server's events, shown by the renderer of the in-process `ask --stream`."""
    cut = lambda: ServerError(f"the server at {client.url} ended the stream before the result")  # noqa: E731
    for piece in render_stream(client.ask_events(fields), cut):
        click.echo(piece, nl=False)
        sys.stdout.flush()


def compare(url: str, question: str, llms: list[str], fmt: str, source_lang: str | None,
            settings: GenerationSettings, beams: int | None) -> None:
    """Every model asked (in turn, as in-process: a model after an error is not asked), then printed."""
    client = ServerClient(url, connections=1)
    try:
        llms = _paired_with_base(client, llms)
        results = [QAResult.from_dict(client.ask(ask_fields(question, source_lang, settings, name, beams)))
                   for name in llms]
    finally:
        client.close()
    click.echo(render_comparison(results, fmt), nl=False)


def _paired_with_base(client: ServerClient, llms: list[str]) -> list[str]:
    """As in-process (llm/models.py compared_models): one adapter alone is compared with its base, the
    base the server runs it on (its /v1/models entry names it)."""
    if len(llms) == 1:
        for entry in client.models():
            if entry.get("id") == llms[0] and entry.get("base"):
                return [entry["base"], llms[0]]
    return llms


def ask_batch(url: str, batch_path: str, output: str, *, model: str | None, beams: int | None,
              concurrency: int | None, settings: GenerationSettings, source_lang: str | None, field: str,
              errors_path, restart: bool, quiet: bool, chunk_rows: int, report: Callable[[str], None]) -> None:
    """`ask --batch` through the server: jobs.ask_file with RemoteQA as the pipeline."""
    from pipeline.jobs import workers as jobs  # the job room only for jobs: one question need not pay for it
    from pipeline.remote.stages import RemoteQA

    # Made when there is work (a finished job asks nothing of the server); it reads the server's batch size.
    load_qa = functools.partial(RemoteQA, url, model=model, beams=beams, concurrency=concurrency)
    summary = jobs.ask_file(batch_path, output, load_qa=load_qa, options=remote_options(url, model, beams),
                            source_lang=source_lang, settings=settings, field=field, errors=errors_path,
                            restart=restart, quiet=quiet, chunk_rows=chunk_rows)
    report(summary.describe())


def translate(url: str, input_path: str, output: str, *, target: str, source: str, beams: int | None,
              concurrency: int | None, field: str, errors_path, restart: bool, quiet: bool, chunk_rows: int,
              report: Callable[[str], None], doc_format: str | None = None) -> None:
    """`translate` through the server: jobs.translate_file with RemoteTranslator as the translator; a
    document (by its extension, or `doc_format`: --format) is parsed and rebuilt here by the same
    document job as in-process, only its segments' translations coming from the server."""
    from pipeline.documents import format_of
    from pipeline.jobs import workers as jobs
    from pipeline.remote.stages import RemoteTranslator

    load = functools.partial(RemoteTranslator, url, target, beams=beams, concurrency=concurrency)
    options = remote_options(url, None, beams)
    if format_of(input_path, doc_format) is not None:
        from pipeline.jobs.documents import translate_document_file

        summary = translate_document_file(input_path, output, to=target, load_translator=load, options=options,
                                          source_lang=source, fmt=doc_format, errors=errors_path, restart=restart,
                                          quiet=quiet, chunk_rows=chunk_rows)
    else:
        summary = jobs.translate_file(input_path, output, to=target, load_translator=load, options=options,
                                      source_lang=source, field=field, errors=errors_path, restart=restart,
                                      quiet=quiet, chunk_rows=chunk_rows)
    report(summary.describe())


def remote_options(url: str, model: str | None, beams: int | None) -> dict:
    """A job's fingerprint through a server: which server, and what was asked of it (the server's
    own models and options are its operator's; the same server and options resume the job)."""
    return {"server": url.strip().rstrip("/"), "model": model, "beams": beams}
