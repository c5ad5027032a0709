"""What a running job shows on stderr: a tqdm bar on a terminal, a line every 30 s otherwise.

The bar measures bytes of input, so it moves within a chunk as the worker reports its share done
(a single 1 MB line moves it batch by batch), with rows/s and an estimate of the time left. It is
drawn from the first report on, after the worker has loaded its models: the "loading ..." lines
come first and are not drawn over.
"""

from __future__ import annotations

import sys
import time

QUIET_LINE_SECONDS = 30.0


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class ProgressDisplay:
    def __init__(self, total_bytes: int, start_bytes: int, rows: int, quiet: bool, *,
                 terminal: bool | None = None, line_seconds: float = QUIET_LINE_SECONDS):
        self.total, self.start_bytes, self.start_rows = total_bytes, start_bytes, rows
        self.quiet = quiet
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.line_seconds = line_seconds
        self.started = self.last_line = time.monotonic()
        self.bar = None

    def _rate(self, rows: float) -> float:
        return (rows - self.start_rows) / max(time.monotonic() - self.started, 1e-9)

    def _eta(self, offset: int) -> str:
        done = offset - self.start_bytes
        if done <= 0:
            return "?"
        return _duration((self.total - offset) * (time.monotonic() - self.started) / done)

    def update(self, offset: int, rows: float) -> None:
        """The input is read up to `offset` bytes and `rows` rows (a fraction within a chunk)."""
        if self.quiet:
            return
        if self.terminal:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, initial=self.start_bytes, unit="B", unit_scale=True,
                                file=sys.stderr, dynamic_ncols=True, desc="bilingual-qa")
            self.bar.update(max(0, offset - self.bar.n))
            self.bar.set_postfix_str(f"{int(rows):,} rows, {self._rate(rows):.1f} rows/s")
        elif time.monotonic() - self.last_line >= self.line_seconds:
            self.last_line = time.monotonic()
            print(f"bilingual-qa: {int(rows):,} rows, {offset / max(self.total, 1):.0%} of the input, "
                  f"{self._rate(rows):.1f} rows/s, {self._eta(offset)} left", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
