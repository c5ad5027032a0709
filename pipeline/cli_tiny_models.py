"""`bilingual-qa tiny-models [DIR]`: see the tool run without the 6 GB download.

It builds tiny checkpoints in the published formats (pipeline/checkpoints.py: phi-2, the two
MarianMT translators and a LoRA fine-tune, random weights) and prints the `export` lines that make
them the defaults, so `eval "$(bilingual-qa tiny-models)"` points every command at them. The
answers are noise; the plumbing (loading, detection, translation, answering, jobs, the server) is
the real code. torch is imported only when the command runs, never for `--help`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from pipeline.errors import BilingualQAError

DEFAULT_DIR = "tiny-models"
# Written last: a directory holding it holds a whole set, so a second run reuses it.
MARKER = "TINY-MODELS.txt"
MARKER_TEXT = ("Tiny checkpoints in the published formats of phi-2, opus-mt-ja-en, fugumt-en-ja and a LoRA\n"
               "adapter, with random weights, made by `bilingual-qa tiny-models`. The answers are noise.\n")
NAMES = {"llm": "phi-2", "ja_en": "opus-mt-ja-en", "en_ja": "fugumt-en-ja", "adapter": "phi-2-finance-lora"}


def exports(directory: Path) -> str:
    """The shell lines that make the set the defaults (comments for a person, ignored by `eval`)."""
    path = {role: shlex.quote(str(directory / name)) for role, name in NAMES.items()}
    return (
        "# Tiny random-weight checkpoints: the answers are noise, the plumbing is real.\n"
        f"export BILINGUAL_QA_LLM={path['llm']}\n"
        f"export BILINGUAL_QA_JA_EN={path['ja_en']}\n"
        f"export BILINGUAL_QA_EN_JA={path['en_ja']}\n"
        f"# base against fine-tune: bilingual-qa compare QUESTION --llm {path['llm']} --llm {path['adapter']}\n"
    )


@click.command("tiny-models")
@click.argument("directory", default=DEFAULT_DIR, type=click.Path(file_okay=False))
@click.option("--quiet", is_flag=True, help="Only errors on stderr.")
def tiny_models(directory: str, quiet: bool) -> None:
    """Build tiny random-weight models in DIRECTORY [default: ./tiny-models] and print the exports that
    point the CLI at them: eval "$(bilingual-qa tiny-models)". The answers are noise; the plumbing is
    real (no download)."""
    from pipeline.quiet import quiet_libraries, status

    folder = Path(directory).expanduser().resolve()
    try:
        with quiet_libraries(quiet):
            if not (folder / MARKER).is_file():
                build(folder, status)
            else:
                status(f"{folder} already holds the tiny models")
    except BilingualQAError as error:
        click.echo(f"bilingual-qa: error: {error}", err=True)
        raise SystemExit(2) from None
    click.echo(exports(folder), nl=False)


def build(folder: Path, status) -> None:
    if folder.exists() and any(folder.iterdir()):
        raise BilingualQAError(f"{folder} is not empty and holds no tiny models; name a new directory")
    status(f"building tiny phi-2, opus-mt-ja-en, fugumt-en-ja and a LoRA adapter in {folder} (seconds)")
    from pipeline.checkpoints import build_tiny_models

    build_tiny_models(folder)  # the directories NAMES lists (tests/test_tiny_models.py checks both agree)
    (folder / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
