"""One fine-tune, from the data file to the adapter directory: `finetune` (what the command calls).

In order, each step refusing what it can before the next costs anything:
1. the options (options.py), the data file's format and fields, the output (outputs.py: an
   existing directory that is not this command's adapter is never touched);
2. the run's identity (the data's hash, every option that changes the adapter): a finished
   adapter of the same identity is "already complete" and loads nothing; an unfinished run of
   another is refused; the same one resumes;
3. the base, located and checked from its small files (a LoRA adapter or a non-phi-2 model is
   refused), and whether training fits the GPU (fit.py), all before any weight is read;
4. the English pairs (pairs.py: a resumable job; the translator loads only for Japanese sides);
5. training (trainer.py), checkpointed every --save-every steps, resumed exactly after a crash;
6. the adapter published whole (outputs.py), the checkpoint removed.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path

from pipeline.errors import JobError, ModelLoadError
from pipeline.jobs.files import input_format
from pipeline.jobs.runner import Checkpoint, JobPaths, fingerprint, load_progress, no_checkpoint
from pipeline.quiet import status
from pipeline.spec import LoadSpec
from pipeline.train.options import FineTune
from pipeline.train.outputs import RunFiles, RunLock, differences, finished_card, publish, start_or_resume
from pipeline.train.pairs import Layout, Pair, PairWorker, find_layout, known_translations, prepare_pairs, read_pairs


@dataclass
class FineTuneResult:
    output: Path
    pairs_file: Path
    errors_file: Path
    rows: int = 0  # rows of the data file (blank and refused ones included)
    failed: int = 0  # rows in the errors file
    train_pairs: int = 0
    eval_pairs: int = 0
    steps: int = 0
    tokens: int = 0  # tokens trained on (prompts and answers, every epoch, no padding)
    train_loss: float | None = None  # the last epoch's mean loss per learned token
    eval_loss: float | None = None  # the held-out pairs' after the last epoch
    seconds: float = 0.0
    already_complete: bool = False

    def describe(self) -> str:
        if self.already_complete:
            return (f"{self.output} is already complete ({self.train_pairs:,} pairs trained on); nothing to do"
                    " (pass --restart to train it again)")
        failed = f"{self.failed:,} refused" + (f" (see {self.errors_file})" if self.failed else "")
        eval_loss = "" if self.eval_loss is None else f", eval loss {self.eval_loss:.4f}"
        return (f"{self.rows:,} rows: {self.train_pairs:,} pairs trained on, {self.eval_pairs:,} held out, {failed};"
                f" {self.steps:,} step{'s' if self.steps != 1 else ''}, train loss {self.train_loss:.4f}{eval_loss}; wrote {self.output} in"
                f" {self.seconds:.1f} s")


def finetune(data: str | Path, output: str | Path, *, checkpoint: Checkpoint = no_checkpoint,
             **options) -> FineTuneResult:
    """Train a LoRA adapter of phi-2 on `data`'s question/answer pairs into the directory `output`
    (options: FineTune's fields); the same call after a crash resumes. `checkpoint(point)`: tests'
    crash points ("after_step", "after_save", and the pair job's)."""
    known = {f.name for f in fields(FineTune)} - {"data", "output"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"finetune() got unexpected options: {', '.join(unknown)}")
    return train_adapter(FineTune(str(data), str(output), **options), checkpoint)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _base_name(name: str) -> str:
    """How adapter_config.json names the base: a local directory absolutely (the adapter may be used
    from elsewhere), a hub id as it is."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def run_identity(job: FineTune, spec: LoadSpec, data: Path, layout: Layout) -> dict:
    """Everything that changes the adapter: the data's content, where pairs come from, the base, the
    translator of Japanese sides and the training options (not the device; as jobs do)."""
    return json.loads(json.dumps({
        "data": str(data.resolve()), "data_sha256": _sha256(data), "layout": layout.describe(),
        "llm": _base_name(spec.llm), "ja_en": spec.ja_en, "beams": spec.beams, "mt_backend": spec.mt_backend,
        "options": job.training_options()}))


def _check_data(job: FineTune) -> Path:
    data = Path(job.data)
    if not data.is_file():
        raise JobError(f"{data}: no such file")
    input_format(data)  # an unknown extension is refused here
    return data


def _resolve_base(name: str):
    """The base to adapt, checked from its files: a phi-2-family checkpoint, not an adapter."""
    from pipeline.llm.models import resolve_llm

    source = resolve_llm(name)
    if source.adapter is not None:
        raise ModelLoadError(f"--llm {name} is a LoRA adapter; finetune trains a new adapter on a full phi-2"
                             f" checkpoint: pass its base (--llm {source.base_name})")
    return source


def _free_bytes(device) -> int | None:
    import torch

    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def _prepare(job: FineTune, spec: LoadSpec, files: RunFiles, data: Path, layout: Layout, tokenizer, *,
             fresh: bool, checkpoint: Checkpoint):
    """The pairs job (pairs.py): resumed, reused when finished with the same options, else started
    over taking the translations the last one made."""
    from pipeline.mt.memory import SQLiteStore
    from pipeline.mt.translator import Translator

    options = {"layout": layout.describe(), "llm": _base_name(spec.llm), "max_length": job.max_length,
               "ja_en": spec.ja_en, "beams": spec.beams, "mt_backend": spec.mt_backend, "dtype": spec.dtype}
    mt_key = hashlib.sha256(json.dumps([options[k] for k in ("ja_en", "beams", "mt_backend", "dtype")]).encode()
                            ).hexdigest()[:16]
    paths = JobPaths.of(data, files.pairs, files.errors)
    existing = load_progress(paths.progress) if paths.progress.exists() else None
    restart = fresh and (existing is None or existing.job != fingerprint(paths, options))
    known = known_translations(files.pairs, mt_key) if restart else {}
    store = SQLiteStore(job.memory) if job.memory else None  # a bad memory file is refused before any work
    load = functools.partial(Translator.from_pretrained, spec.ja_en, device=job.device, dtype=job.dtype,
                             backend=spec.mt_backend, target_lang="en", num_beams=spec.beams, option="--ja-en",
                             memory=store)
    status(f"reading pairs from {data} into {files.pairs}")
    summary = prepare_pairs(data, files.pairs, files.errors, layout, options,
                            lambda: PairWorker(load, tokenizer, job.max_length, mt_key, known),
                            restart=restart, quiet=job.quiet, checkpoint=checkpoint)
    gc.collect()  # the translator's weights, before phi-2's load
    return summary


def split(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held out): floor(fraction x pairs) held out, chosen by the seed; at least one trains."""
    import torch

    held = min(int(len(pairs) * fraction), len(pairs) - 1)
    if fraction > 0 and held == 0:
        status(f"{len(pairs)} pairs are too few to hold out {fraction:.0%}: no eval loss")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = set(order[:held])
    return ([p for i, p in enumerate(pairs) if i not in chosen], [p for i, p in enumerate(pairs) if i in chosen])


def train_adapter(job: FineTune, checkpoint: Checkpoint = no_checkpoint) -> FineTuneResult:
    """Run (or resume, or find complete) the fine-tune `job`; see the module docstring."""
    started = time.monotonic()
    job.check()
    files = RunFiles.of(job.output)
    data = _check_data(job)
    layout = find_layout(data, job.question_field, job.answer_field)
    spec = LoadSpec.resolve(llm=job.llm, ja_en=job.ja_en, device=job.device, dtype=job.dtype,
                            mt_backend=job.mt_backend, beams=job.beams)
    identity = run_identity(job, spec, data, layout)
    with RunLock(files.lock):
        card = finished_card(files.output)
        if card is not None and not job.restart:
            if card["fingerprint"] == identity:
                return _complete(files, card)
            raise JobError(f"{files.output} holds an adapter trained {differences(card['fingerprint'], identity)};"
                           " pass --restart to train it again")
        resumed = start_or_resume(files, identity, job.restart)
        result = _train(job, spec, files, data, layout, identity, resumed=resumed, checkpoint=checkpoint)
    result.seconds = time.monotonic() - started
    return result


def _complete(files: RunFiles, card: dict) -> FineTuneResult:
    data = card["data"]
    return FineTuneResult(files.output, files.pairs, files.errors, data["rows"], data["failed"], data["train_pairs"],
                          data["eval_pairs"], card["steps"], card["tokens"], card["losses"]["train"],
                          card["losses"]["eval"], already_complete=True)


def _train(job: FineTune, spec: LoadSpec, files: RunFiles, data: Path, layout: Layout, identity: dict, *,
           resumed: bool, checkpoint: Checkpoint) -> FineTuneResult:
    from pipeline.llm.models import tokenizer_for
    from pipeline.loading import resolve_device, resolve_dtype
    from pipeline.train.fit import Shape, choose_checkpointing

    device = resolve_device(job.device)
    dtype = resolve_dtype(job.dtype, device)
    source = _resolve_base(spec.llm)
    checkpointing = choose_checkpointing(Shape.of(Path(source.directory) / "config.json"), job, dtype.itemsize,
                                         _free_bytes(device), str(device), spec.llm)
    tokenizer = tokenizer_for(source)
    summary = _prepare(job, spec, files, data, layout, tokenizer, fresh=not resumed, checkpoint=checkpoint)
    pairs = read_pairs(files.pairs)
    if not pairs:  # nothing trained: no run record stays (the pairs job's files show why)
        files.progress.unlink(missing_ok=True)
        where = f" (see {files.errors})" if summary.failed else ""
        raise JobError(f"{data} has no usable question/answer pair: {summary.rows:,} rows, {summary.failed:,} refused"
                       f"{where}")
    from pipeline.train.session import TrainingSession

    session = TrainingSession(job, source, tokenizer, device, dtype, checkpointing, files,
                              hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest())
    train_pairs, eval_pairs = split(pairs, job.eval_fraction, job.seed)
    state = session.run(train_pairs, eval_pairs, checkpoint)
    last = state.history[-1]
    card = {"base": _base_name(spec.llm), "fingerprint": identity,
            "data": {"file": str(data), "sha256": identity["data_sha256"], "rows": summary.rows,
                     "failed": summary.failed, "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs)},
            "options": {**job.training_options(), "gradient_checkpointing": checkpointing, "device": str(device)},
            "losses": {"train": last["train_loss"], "eval": last["eval_loss"]}, "epochs": state.history,
            "steps": state.step, "tokens": state.tokens_seen}
    publish(files, session.trainer.save_adapter, card["base"], card)
    files.checkpoint.unlink(missing_ok=True)
    files.progress.unlink(missing_ok=True)
    return FineTuneResult(files.output, files.pairs, files.errors, summary.rows, summary.failed, len(train_pairs),
                          len(eval_pairs), state.step, state.tokens_seen, last["train_loss"], last["eval_loss"])
