"""The files of a run, beside the adapter directory OUTPUT, and the adapter's publication.

- `OUTPUT.progress.json`: the run's identity (the data's hash and every option that changes the
  adapter), written first and atomically: a rerun with the same identity resumes, another is refused.
- `OUTPUT.pairs.jsonl` (+ its job record): the English pairs (pairs.py); kept after the run.
- `OUTPUT.errors.jsonl`: the rows that cannot train, with line numbers and reasons (only if any).
- `OUTPUT.checkpoint.pt`: the training state (state.py); removed once the adapter is published.
- `OUTPUT.lock`: held while a run works, so a second run on the same output stops at once.

The adapter is written into `OUTPUT.partial`, then renamed to OUTPUT: the directory appears only
when training has finished, whole. It holds peft's files (adapter_config.json naming the base as
`base_model_name_or_path`, adapter_model.safetensors) and the card: `finetune.json` (the data file's
hash, rows used, options, final train and eval loss; also what a rerun compares) and README.md.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import JobError
from pipeline.jobs.runner import fsync_directory, write_json

CARD = "finetune.json"
MADE_BY = "bilingual-qa finetune"
RECORD_VERSION = 1


@dataclass(frozen=True)
class RunFiles:
    output: Path
    progress: Path
    pairs: Path
    errors: Path
    checkpoint: Path
    lock: Path
    partial: Path

    @classmethod
    def of(cls, output: str | Path) -> "RunFiles":
        target = Path(output)
        if not target.parent.is_dir():
            raise JobError(f"{target.parent}: no such directory for the output")

        def beside(suffix: str) -> Path:
            return target.with_name(target.name + suffix)

        return cls(target, beside(".progress.json"), beside(".pairs.jsonl"), beside(".errors.jsonl"),
                   beside(".checkpoint.pt"), beside(".lock"), beside(".partial"))



class RunLock:
    """An exclusive lock on OUTPUT.lock for the run's whole life; the file goes when the run ends."""

    def __init__(self, path: Path):
        self.path = path
        self.file = None

    def __enter__(self) -> "RunLock":
        self.file = open(self.path, "a+b")
        try:
            import fcntl

            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: no advisory locks
            pass
        except OSError:
            self.file.close()
            raise JobError(f"another finetune is writing {self.path.with_suffix('')}") from None
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)  # while held: a run waiting on it finds the lock gone, then takes a new one
        self.file.close()


def finished_card(output: Path) -> dict | None:
    """The card of the adapter already at `output`, None where there is nothing; a JobError where
    `output` exists and is not an adapter this command made (never overwritten, --restart or not)."""
    if not output.exists() and not output.is_symlink():
        return None
    try:
        card = json.loads((output / CARD).read_text(encoding="utf-8"))
        if card.get("made_by") == MADE_BY and isinstance(card.get("fingerprint"), dict):
            return card
    except (OSError, ValueError):
        pass
    raise JobError(f"{output} exists and is not an adapter made by bilingual-qa finetune; choose another --output")


def differences(old: dict, new: dict) -> str:
    """How the run recorded as `old` differs from the one asked for now, in words."""
    if old.get("data_sha256") != new.get("data_sha256") or old.get("data") != new.get("data"):
        return "from other data (or data that has changed since)"
    names = [name for name in new if name != "options" and old.get(name) != new[name]]
    names += [name for name in new.get("options", {}) if old.get("options", {}).get(name) != new["options"][name]]
    return "with other options (" + ", ".join(names or ["options"]) + ")"


def start_or_resume(files: RunFiles, identity: dict, restart: bool) -> bool:
    """True where this run resumes an unfinished one of the same identity; False where it starts
    (the record written first, so a crash from here on resumes rather than refuses)."""
    record = None
    if files.progress.exists() and not restart:
        try:
            record = json.loads(files.progress.read_text(encoding="utf-8"))
        except ValueError as error:
            raise JobError(f"{files.progress} cannot be read ({error}); pass --restart to start over") from None
    if record is not None and record.get("fingerprint") == identity:
        return True
    if record is not None:
        raise JobError(f"{files.output} has an unfinished run {differences(record.get('fingerprint', {}), identity)};"
                       " pass --restart to start over")
    files.checkpoint.unlink(missing_ok=True)
    write_json(files.progress, {"version": RECORD_VERSION, "fingerprint": identity})
    return False


def _card_readme(card: dict) -> str:
    data, losses = card["data"], card["losses"]
    eval_loss = "none held out" if losses["eval"] is None else f"{losses['eval']:.4f}"
    lines = [f"# LoRA adapter of {card['base']}", "",
             f"Made by `{MADE_BY}` from `{data['file']}` (sha256 `{data['sha256']}`): {data['train_pairs']:,} pairs "
             f"trained on, {data['eval_pairs']:,} held out, {data['failed']:,} rows refused.", "",
             f"Final train loss {losses['train']:.4f}; eval loss {eval_loss}; {card['steps']:,} steps.", "",
             "Options: " + ", ".join(f"{key} {value}" for key, value in card["options"].items()), "",
             "Ask with it: `bilingual-qa ask \"...\" --llm THIS_DIRECTORY`; compare it with its base: "
             f"`bilingual-qa compare \"...\" --llm {card['base']} --llm THIS_DIRECTORY`.", ""]
    return "\n".join(lines)


def publish(files: RunFiles, save_adapter, base_name: str, card: dict) -> None:
    """Write the adapter into OUTPUT.partial, complete, then rename it to OUTPUT (replacing an
    adapter of an earlier run of this command, which --restart allowed)."""
    shutil.rmtree(files.partial, ignore_errors=True)
    save_adapter(str(files.partial))
    config_file = files.partial / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_name  # what `ask --llm OUTPUT` loads the adapter onto
    config_file.write_text(json.dumps(config, indent=1), encoding="utf-8")
    (files.partial / CARD).write_text(json.dumps({"made_by": MADE_BY, **card}, ensure_ascii=False, indent=1),
                                      encoding="utf-8")
    (files.partial / "README.md").write_text(_card_readme(card), encoding="utf-8")
    for file in files.partial.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    fsync_directory(files.partial)
    old = files.output.with_name(files.output.name + ".old")
    if files.output.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(files.output, old)
    os.replace(files.partial, files.output)
    fsync_directory(files.output.parent)
    shutil.rmtree(old, ignore_errors=True)
