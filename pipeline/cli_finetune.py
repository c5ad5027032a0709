"""`bilingual-qa finetune DATA --output ADAPTER_DIR`: a thin wrapper over `pipeline.finetune`.

A module of its own (cli.py registers it with one line): the options are many and none is shared
with the other commands but the models' and the device's. Like every command, it imports neither
torch nor transformers until the checks that need no model have passed (tests/test_cli_imports.py).
"""

from __future__ import annotations

import click

from pipeline.cli_options import FiniteFloatRange, check_before_loading, with_options
from pipeline.spec import BACKEND_CHOICES, DEFAULT_JA_EN, DEFAULT_LLM, MAX_SEED
from pipeline.train.options import DEFAULT_TARGETS, GRADIENT_CHECKPOINTING_CHOICES, FineTune

DEFAULTS = FineTune("", "")


def _data_options(command):
    return with_options([
        click.option("--output", "-o", required=True, metavar="ADAPTER_DIR",
                     help="The adapter directory to write; it appears only when training has finished. Beside it: "
                          "ADAPTER_DIR.pairs.jsonl (the English pairs), ADAPTER_DIR.errors.jsonl (refused rows)."),
        click.option("--llm", envvar="BILINGUAL_QA_LLM", default=None, show_envvar=True,
                     help=f"The phi-2 checkpoint to adapt: hub id or directory (phi-msft too) [default: {DEFAULT_LLM}]."),
        click.option("--question-field", default=None,
                     help="JSONL field or CSV/TSV column of the question [default: question, or the "
                          "instruction/input/output layout where there is no question]."),
        click.option("--answer-field", default=None, help="Field or column of the answer [default: answer]."),
        click.option("--ja-en", envvar="BILINGUAL_QA_JA_EN", default=None, show_envvar=True,
                     help=f"Japanese->English MarianMT model for Japanese sides [default: {DEFAULT_JA_EN}]."),
        click.option("--memory", type=click.Path(dir_okay=False), default=None,
                     help="Translation memory (SQLite file) shared with translate and ask --batch."),
        click.option("--beams", type=click.IntRange(1, 16), default=None,
                     help="Translation beam width [default: the translation model's own]."),
        click.option("--mt-backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
                     help="Translation backend."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--dtype", default="auto", show_default=True,
                     help="auto (bfloat16 on GPUs of compute capability 8.0+, float16 below, float32 on CPU), "
                          "float16, bfloat16 or float32: the frozen base's; the adapter trains in float32."),
    ])(command)


def _training_options(command):
    return with_options([
        click.option("--epochs", type=click.IntRange(1), default=DEFAULTS.epochs, show_default=True),
        click.option("--learning-rate", type=FiniteFloatRange(0, min_open=True), default=DEFAULTS.learning_rate,
                     show_default=True, help="AdamW's, decayed linearly to 0."),
        click.option("--lora-r", type=click.IntRange(1), default=DEFAULTS.lora_r, show_default=True),
        click.option("--lora-alpha", type=FiniteFloatRange(0, min_open=True), default=DEFAULTS.lora_alpha,
                     show_default=True),
        click.option("--lora-dropout", type=FiniteFloatRange(0, 1, max_open=True), default=DEFAULTS.lora_dropout,
                     show_default=True),
        click.option("--target-modules", default=",".join(DEFAULT_TARGETS), show_default=True,
                     help="phi-2's linear layers to adapt, comma-separated (lm_head too)."),
        click.option("--batch-tokens", type=click.IntRange(16), default=DEFAULTS.batch_tokens, show_default=True,
                     help="Tokens per optimizer step (packed sequences of --max-length)."),
        click.option("--max-length", type=click.IntRange(8, 2048), default=DEFAULTS.max_length, show_default=True,
                     help="Longest pair in tokens with its prompt; longer rows go to the errors file."),
        click.option("--eval-fraction", type=FiniteFloatRange(0, 1, max_open=True), default=DEFAULTS.eval_fraction,
                     show_default=True, help="Pairs held out; their loss after each epoch."),
        click.option("--seed", type=click.IntRange(0, MAX_SEED), default=DEFAULTS.seed, show_default=True),
        click.option("--save-every", type=click.IntRange(1), default=DEFAULTS.save_every, show_default=True,
                     help="Steps between checkpoints: a crash costs at most this much training."),
        click.option("--gradient-checkpointing", type=click.Choice(GRADIENT_CHECKPOINTING_CHOICES), default="auto",
                     show_default=True, help="Recompute activations in the backward pass (auto: where the GPU "
                                             "needs it)."),
        click.option("--restart", is_flag=True, help="Start over: a new run replaces an unfinished one or an "
                                                      "adapter this command made."),
        click.option("--quiet", "-q", is_flag=True,
                     help="Only errors and the one-line summary on stderr: no loading lines, bars or warnings."),
    ])(command)


def finetune_command(user_errors) -> click.Command:
    """The command, its function wrapped by cli.py's `user_errors` (one-line errors, exit code 2)."""

    @click.command("finetune")
    @click.argument("data", type=click.Path(dir_okay=False))
    @_data_options
    @_training_options
    @user_errors
    def finetune(data, output, target_modules, **options):
        """Train a LoRA adapter of phi-2 on your own questions and answers (DATA: .jsonl, .csv or .tsv;
        Japanese sides are translated to English) into ADAPTER_DIR, which ask, compare, ask --batch and
        serve load with --llm ADAPTER_DIR. Run the same command again after a crash to go on."""
        targets = tuple(name.strip() for name in target_modules.split(","))
        job = FineTune(data, output, target_modules=targets, **options)
        job.check()  # before torch is even imported
        from pipeline.train.pairs import find_layout

        find_layout(_existing_file(data), job.question_field, job.answer_field)
        check_before_loading(job.device, None, job.mt_backend)
        from pipeline.train.run import train_adapter

        result = train_adapter(job)
        click.echo(f"bilingual-qa: {result.describe()}", err=True)

    return finetune


def _existing_file(data: str):
    from pathlib import Path

    from pipeline.errors import JobError

    path = Path(data)
    if not path.is_file():
        raise JobError(f"{path}: no such file")
    return path
