"""What a training run shows on stderr, as a job does (jobs/progress.py): a tqdm bar of steps on a
terminal (loss, tokens/s, time left), a line every 30 s elsewhere (a log, a notebook cell), nothing
with --quiet. Tokens/s counts the tokens trained on (prompt and answer, no padding) since this
process started training."""

from __future__ import annotations

import sys
import time

from pipeline.jobs.progress import QUIET_LINE_SECONDS


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class TrainingProgress:
    def __init__(self, total_steps: int, start_step: int, quiet: bool, *, terminal: bool | None = None,
                 line_seconds: float = QUIET_LINE_SECONDS):
        self.total, self.start_step, self.quiet = total_steps, start_step, quiet
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.line_seconds = line_seconds
        self.started = self.last_line = time.monotonic()
        self.tokens = 0
        self.bar = None

    def tokens_per_second(self) -> float:
        return self.tokens / max(time.monotonic() - self.started, 1e-9)

    def left(self, step: int) -> str:
        done = step - self.start_step
        return duration((self.total - step) * (time.monotonic() - self.started) / done) if done > 0 else "?"

    def update(self, step: int, loss: float, tokens: int) -> None:
        """Step `step` (1-based, of all epochs) is done; its loss per learned token; its real tokens."""
        self.tokens += tokens
        if self.quiet:
            return
        if self.terminal:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, initial=self.start_step, unit="step", file=sys.stderr,
                                dynamic_ncols=True, desc="bilingual-qa finetune")
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {loss:.3f}, {self.tokens_per_second():,.0f} tokens/s")
        elif time.monotonic() - self.last_line >= self.line_seconds or step == self.total:
            self.last_line = time.monotonic()
            print(f"bilingual-qa: step {step:,}/{self.total:,}, loss {loss:.3f}, "
                  f"{self.tokens_per_second():,.0f} tokens/s, {self.left(step)} left", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
