"""Run the app under uvicorn: models load on a thread while /health says 503; SIGTERM or Ctrl-C
stops taking connections, lets the requests in flight finish (streams included), then exits."""

from __future__ import annotations

import logging
import signal

import uvicorn

from pipeline.llm.models import resolve_llm
from pipeline.loading import locate_model
from pipeline.qa import model_names
from pipeline.serve.app import ServerConfig, create_app
from pipeline.serve.models import LoadOptions, ModelRegistry


def check_models(options: LoadOptions) -> None:
    """A missing model fails now, in one line, before the server starts."""
    names = model_names(None, options.ja_en, options.en_ja)
    for name in options.llms or [model_names()["llm"]]:
        resolve_llm(name, options.base)  # a checkpoint, or a LoRA adapter and its base, as `ask` takes
    locate_model(names["ja_en"], "--ja-en")
    locate_model(names["en_ja"], "--en-ja")


def run_server(options: LoadOptions, *, host: str = "127.0.0.1", port: int = 8000,
               config: ServerConfig | None = None, log_level: str = "info") -> None:
    check_models(options)
    logging.basicConfig(level=log_level.upper(), format="bilingual-qa: %(message)s")
    app = create_app(lambda: ModelRegistry.load(options), config)
    # uvicorn drains, then raises the signal again for the handler it found: with this one a SIGTERM
    # ends in a clean exit (code 0) after the models are closed, not in the default handler's kill.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if app.state.serve.models is not None:
            app.state.serve.models.close()
