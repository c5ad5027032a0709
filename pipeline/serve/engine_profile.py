"""The answer engine's profile: where the decode thread's time goes, the line the server logs about
it, and the paged answer cache's blocks (batching.py's scheduler keeps one per report period)."""

from __future__ import annotations

import time


class EngineProfile:
    """Where the decode thread's time goes, logged every REPORT_SECONDS while it works and once when it
    goes idle (the profile serve_load.py's runs leave in the server's log), with the answer cache's
    blocks and preemptions."""

    REPORT_SECONDS = 5.0

    def __init__(self, batch=None):
        self.batch = batch
        self.began = time.perf_counter()
        self.steps = self.rows = self.adds = self.prompts = 0
        self.step_s = self.add_s = self.longest_step = 0.0
        self.most_rows = 0
        self.preempted_before = getattr(batch, "preemptions", 0)

    def step(self, rows: int, seconds: float) -> None:
        self.steps, self.rows, self.step_s = self.steps + 1, self.rows + rows, self.step_s + seconds
        self.longest_step = max(self.longest_step, seconds)
        self.most_rows = max(self.most_rows, rows)

    def add(self, prompts: int, seconds: float) -> None:
        self.adds, self.prompts, self.add_s = self.adds + 1, self.prompts + prompts, self.add_s + seconds

    def due(self) -> bool:
        return time.perf_counter() - self.began >= self.REPORT_SECONDS

    def left(self) -> float | None:
        """Seconds until the line is due, None while there is nothing to say (an idle engine sleeps)."""
        return max(self.began + self.REPORT_SECONDS - time.perf_counter(), 0) if self.steps or self.adds else None

    def line(self) -> str:
        wall = time.perf_counter() - self.began
        steps = max(self.steps, 1)
        line = (f"answer engine, last {wall:.1f} s: {self.steps} steps, {self.rows / steps:.1f} rows (at most"
                f" {self.most_rows}) and {self.step_s / steps * 1e3:.2f} ms each (longest"
                f" {self.longest_step * 1e3:.0f} ms); {self.adds} prefills of {self.prompts} prompts,"
                f" {self.add_s * 1e3:.0f} ms in all; {max(wall - self.step_s - self.add_s, 0):.2f} s neither")
        blocks = cache_blocks(self.batch)
        if blocks is not None:
            preempted = self.batch.preemptions - self.preempted_before
            line += (f"; cache blocks {blocks[0]} in use, {blocks[1]} free; {preempted} rows preempted")
        return line


def cache_blocks(batch) -> tuple[int, int] | None:
    """(blocks in use, blocks free) of a decode batch's paged answer cache, None where it has none."""
    manager = getattr(getattr(batch, "cache", None), "blocks", None)
    return None if manager is None else (manager.used, manager.free)
