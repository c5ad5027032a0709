"""Status lines on stderr and `--quiet`: what every command enters first, so it imports no torch.

`status` prints a line unless BILINGUAL_QA_QUIET=1; `quiet_libraries` sets that (and the libraries'
bars and verbosity) for one command and puts everything back when it ends.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator

QUIET_ENV = "BILINGUAL_QA_QUIET"
_shown_once: set[str] = set()


def status(message: str, *, once: bool = False) -> None:
    """A status line on stderr, kept off stdout so JSON output stays clean; `once`: at most once
    per process (a note that both translation models would print)."""
    if once:
        if message in _shown_once:
            return
        _shown_once.add(message)
    if os.environ.get(QUIET_ENV) != "1":
        print(f"bilingual-qa: {message}", file=sys.stderr, flush=True)


# What --quiet sets in the environment: read by this module's status lines, by transformers and the
# hub when they are imported, and by a local cluster's workers, which inherit it.
QUIET_ENVIRONMENT = {QUIET_ENV: "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                     "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


@contextlib.contextmanager
def quiet_libraries(quiet: bool) -> Iterator[None]:
    """Quiet: no status line, no progress bar, no library warning; errors still show. Otherwise the
    libraries' bars (transformers' per-tensor "Loading weights", hub downloads) show on a terminal
    only: in a log they are noise, and our own lines ("loading NAME", "downloading NAME") say it.
    Everything is as before once the block ends (a process may run several commands: tests, scripts)."""
    bars_off = quiet or not sys.stderr.isatty()
    saved = {name: os.environ.get(name) for name in QUIET_ENVIRONMENT}
    # transformers is not imported here (a command that loads no model, `--server`, never needs it);
    # one imported inside the block reads our environment, and is given its own level back at the end.
    imported_before = "transformers" in sys.modules
    if quiet:
        os.environ.update(QUIET_ENVIRONMENT)
    elif bars_off:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    undo = _quiet_imported_libraries(quiet, bars_off)
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            yield
    finally:
        undo()
        if quiet and not imported_before and "transformers.utils.logging" in sys.modules:
            _unquiet_late_transformers(saved["TRANSFORMERS_VERBOSITY"])
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _unquiet_late_transformers(verbosity: str | None) -> None:
    """The level transformers would have read at import without --quiet (its own default: warning)."""
    logging = importlib.import_module("transformers.utils.logging")
    logging.set_verbosity(logging.log_levels.get(verbosity or "", logging.WARNING))


def _quiet_imported_libraries(quiet: bool, bars_off: bool) -> Callable[[], None]:
    """Set the logging and bars of the libraries already imported (the environment is read at import
    only); returns what sets them back."""
    steps: list[Callable[[], None]] = []
    if "huggingface_hub" in sys.modules and bars_off:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            steps.append(enable_progress_bars)
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
        if bars_off:
            transformers_logging.disable_progress_bar()
        if quiet:
            transformers_logging.set_verbosity_error()
        steps.append(lambda: transformers_logging.set_verbosity(verbosity))
        if bars:
            steps.append(transformers_logging.enable_progress_bar)

    def undo() -> None:
        for step in steps:
            step()
    return undo
