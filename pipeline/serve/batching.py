"""Many callers, one model: each model stage runs on its own thread, batching what callers left waiting.

`AnswerScheduler` owns one answer engine. Where the engine can decode step by step
(llm/continuous.py), the questions that arrive while others are decoding join the running batch at
the next step, prefilled together, and a finished or abandoned row leaves it at once (continuous
batching); a question the batch has no room for (rows, or the answer cache's blocks) waits, never
fails for it. Otherwise every question that arrived while the last batch ran goes into the next
`generate` call (micro-batching). The engine thread hands tokens to the callers' loop and never
waits for a caller. Whatever one request brings about (a row whose logits overflow, a failed
prefill, a bug met by one job), it fails that request, or the ones it shared the failing call with,
and the thread goes on serving the others.

The translators' stage, `TranslationBatcher`, is in translation.py.

Callers live on the asyncio loop; results come back through `loop.call_soon_threadsafe` and
concurrent futures, so no stage ever runs on the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from typing import Callable

from pipeline.gpu_gate import GATE
from pipeline.llm.continuous import open_decode_batch
from pipeline.serve.engine_profile import EngineProfile, cache_blocks
from pipeline.spec import GenerationSettings

log = logging.getLogger("bilingual_qa.serve")
STOP = object()  # queued to end a stage's thread


class StageStopped(RuntimeError):
    """A stage's thread has stopped: the server cannot answer until it is restarted."""
    hint = "restart the server"


class StageFailed(StageStopped):
    """A stage's thread met an error it did not expect while it held this request: the request is
    dropped, the stage goes on serving the others."""
    hint = "try again"


class AnswerJob:
    """One question's generation. The scheduler hands it tokens (`push`), then its end (`end(eos)`)
    or a failure (`fail`); the caller reads it as an async iterator: each step, every id that has
    arrived (a list), until the end (`eos` then tells whether it came at end-of-text). A failure is
    raised to the reader."""

    def __init__(self, prompt: list[int], settings: GenerationSettings, loop: asyncio.AbstractEventLoop,
                 stop_check: Callable | None = None, adapter: int = 0):
        self.prompt = prompt
        self.adapter = adapter  # the engine's LoRA adapter the row applies (0: the base; llm/multi_lora.py)
        self.settings = settings
        self.stop_check = stop_check  # used where the engine generates whole rows (micro-batching)
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()  # what the scheduler handed over, not yet read
        self.cancelled = False
        self.count = 0
        self.outbox: list | None = None  # set by a scheduler that hands a step's events over at once
        self.finished = False  # the end has been read
        self.eos = False

    def _put(self, item) -> None:
        if self.outbox is not None:
            self.outbox.append((self, item))
        else:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def push(self, token: int) -> None:
        self.count += 1
        self._put((_TOKEN, token))

    def end(self, eos: bool) -> None:
        self._put((_END, eos))

    def fail(self, error: BaseException) -> None:
        self._put((_ERROR, error))

    def cancel(self) -> None:
        """The caller is gone or has what it needs: the row is freed at the next step."""
        self.cancelled = True

    def __aiter__(self) -> "AnswerJob":
        return self

    async def __anext__(self) -> list[int]:
        """The ids that arrived since the last read, all of them: under load the caller's loop falls
        behind the decode steps and then takes fewer, longer pieces instead of falling further behind."""
        if self.finished:
            raise StopAsyncIteration
        items = [await self.events.get()]
        while not self.events.empty():
            items.append(self.events.get_nowait())
        tokens = []
        for kind, value in items:
            if kind == _ERROR:
                raise value
            if kind == _END:
                self.finished, self.eos = True, value
                break
            tokens.append(value)
        if not tokens and self.finished:
            raise StopAsyncIteration
        return tokens


_TOKEN, _END, _ERROR = "token", "end", "error"  # what a job's queue holds: (kind, value)


def _hand_over(outbox: list) -> None:
    """Give each job its events: one wake-up of each callers' loop per decode step, not one per token."""
    by_loop: dict = {}
    for job, item in outbox:
        by_loop.setdefault(job.loop, []).append((job.events, item))
    outbox.clear()
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list) -> None:
    for events, item in items:
        events.put_nowait(item)


class AnswerScheduler:
    def __init__(self, engine, *, max_rows: int = 64, on_tokens: Callable[[int], None] | None = None,
                 batching: str = "auto", gpu_memory: float | None = None):
        self.engine = engine
        self.eos = engine.eos_token_id
        self.max_rows = max_rows
        self.on_tokens = on_tokens or (lambda n: None)
        self.waiting: queue.Queue = queue.Queue()
        self.running_rows = 0
        self._in_hand: list = []  # the containers of jobs the thread holds (failed if it dies)
        self.decode_batch = gated(open_decode_batch, engine, max_rows, batching, gpu_memory)
        if self.decode_batch is not None:
            gated(self.decode_batch.warm)  # the cache and every bucket's graph, before the first caller
        self.mode = "continuous" if self.decode_batch is not None else "micro-batch"
        target = self._run_continuous if self.decode_batch is not None else self._run_micro_batches
        self.thread = threading.Thread(target=self._guard(target), name=f"answer-{engine.name}", daemon=True)
        self.thread.start()

    def cache_blocks(self) -> tuple[int, int] | None:
        """(blocks in use, blocks free) of the paged answer cache; None where the engine has none."""
        return cache_blocks(self.decode_batch)

    def submit(self, job: AnswerJob) -> None:
        self.waiting.put(job)
        if not self.thread.is_alive():  # stopped (or died) before it could take this job
            self._fail_all(StageStopped(f"the {self.thread.name} stage has stopped"))

    def close(self) -> None:
        self.waiting.put(STOP)
        self.thread.join(timeout=30)

    def _guard(self, target):
        """The thread's body: `target`, begun again after an error it did not expect (the jobs it held
        fail with it; those still queued are served), so no request can stop the stage. Only a
        failure to even begin again (or an interpreter shutting down) ends the thread."""
        def run():
            while True:
                try:
                    target()
                    return
                except Exception as error:  # noqa: BLE001 - one request's trouble, not the server's
                    log.exception("the %s thread met an error; its rows fail and it goes on", self.thread.name)
                    try:
                        self._fail_held(StageFailed(
                            f"the {self.thread.name} stage met an error ({type(error).__name__}) and dropped this request"))
                    except BaseException:  # noqa: BLE001 - cannot even recover: stop, loudly, hang nobody
                        break
                except BaseException:  # noqa: BLE001 - a dead engine thread must be loud and hang nobody
                    break
            log.error("the %s thread stopped", self.thread.name)
            self._fail_all(StageStopped(f"the {self.thread.name} stage has stopped"))
        return run

    def _fail_held(self, error: BaseException) -> None:
        """The jobs the thread was running when it met `error` fail with it (their rows leave the
        batch); those still waiting for a row go back in the queue."""
        for held in self._in_hand:
            if isinstance(held, deque):
                for job in held:
                    self.waiting.put(job)
            else:
                jobs = list(held.items()) if isinstance(held, dict) else [(None, job) for job in held]
                for key, job in jobs:
                    job.outbox = None
                    job.fail(error)
                    if key is not None and self.decode_batch is not None:
                        gated(self.decode_batch.drop, key)
            held.clear()
        self._in_hand = []

    def _fail_all(self, failure: BaseException) -> None:
        """Every job the dead thread held or that waits for it gets `failure` (its caller a 503)."""
        jobs = [job for held in self._in_hand for job in (held.values() if isinstance(held, dict) else held)]
        while True:
            try:
                jobs.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        for job in jobs:
            if job is not STOP:
                job.outbox = None  # straight to its caller: no step will hand it over
                job.fail(failure)

    # ---- continuous batching -------------------------------------------------------------------

    def _run_continuous(self) -> None:
        """Between two decode steps: take what arrived, admit what has room (prefilled together),
        free the rows whose callers left, then step. A request with no room waits, in order."""
        batch = self.decode_batch
        live: dict[int, AnswerJob] = {}
        held: deque[AnswerJob] = deque()  # arrived, waiting for a free row
        outbox: list = []  # this step's events for the callers, handed over together
        self._in_hand = [live, held]
        self.profile = EngineProfile(batch)
        while True:
            if self.profile.due():
                if self.profile.steps or self.profile.adds:
                    log.info(self.profile.line())
                self.profile = EngineProfile(batch)
            idle = not live and not held  # waits for work, but not past the profile's line
            if self._take_arrivals(held, block=idle, outbox=outbox, timeout=self.profile.left() if idle else None):
                self._finish_all(live, batch)
                _hand_over(outbox)
                return
            self._admit(held, live, batch)
            _hand_over(outbox)  # the first tokens, before the next step
            for key in [key for key, job in live.items() if job.cancelled]:
                gated(batch.drop, key)
                del live[key]
            self.running_rows = len(live)
            if not live:
                continue
            try:
                began = time.perf_counter()
                tokens = gated(batch.step)
                self.profile.step(len(live), time.perf_counter() - began)
            except Exception as error:  # noqa: BLE001 - fail the rows of this batch, keep serving
                log.exception("decode step failed")
                for key, job in list(live.items()):
                    job.fail(error)
                    gated(batch.drop, key)
                live.clear()
                _hand_over(outbox)
                continue
            self.on_tokens(sum(not isinstance(token, BaseException) for token in tokens.values()))
            for key, token in tokens.items():
                if key in live:
                    self._deliver(key, live[key], token, live, batch)
                else:  # a row no job holds (its job failed with the thread's last error): let it go
                    gated(batch.drop, key)
            _hand_over(outbox)
            self.running_rows = len(live)

    def _take_arrivals(self, held: deque, block: bool, outbox: list, timeout: float | None = None) -> bool:
        """Move every queued job to `held` (waiting for the first when `block`, up to `timeout`); True to stop."""
        while True:
            try:
                job = self.waiting.get(block=block, timeout=timeout)
            except queue.Empty:
                return False
            block = False
            if job is STOP:
                for waiting in held:
                    waiting.fail(RuntimeError("the server is shutting down"))
                return True
            job.outbox = outbox
            held.append(job)

    def _admit(self, held: deque, live: dict, batch) -> None:
        """The held jobs that fit now, oldest first, into the batch in one add of at most
        `batch.prefill_tokens` padded tokens: a burst joins over a few steps, each chunk's callers
        get their first token as soon as it is prefilled, and the rows decoding stall one chunk at a
        time."""
        joining, width = [], 0
        fits = batch.joinable([len(job.prompt) for job in itertools.islice(held, batch.room())])
        for _ in range(fits):  # a cancelled or refused job leaves its place unused until the next step
            job = held[0]
            if job.cancelled:
                held.popleft()
                continue
            if joining and max(width, len(job.prompt)) * (len(joining) + 1) > batch.prefill_tokens:
                break
            held.popleft()
            try:
                batch.check(job.prompt, job.settings)
            except Exception as error:  # noqa: BLE001 - can never fit: this caller's error alone
                job.fail(error)
                continue
            joining.append(job)
            width = max(width, len(job.prompt))
        if joining:
            self._join(joining, live, batch)

    def _join(self, joining: list[AnswerJob], live: dict, batch) -> None:
        """Prefill `joining` together; if that fails (the batch has rolled the add back), each alone,
        so the one request that fails it fails alone."""
        try:
            began = time.perf_counter()
            added = gated(batch.add, [(job.prompt, job.settings, *_adapter_arg(job.adapter)) for job in joining])
            self.profile.add(len(joining), time.perf_counter() - began)
        except Exception as error:  # noqa: BLE001 - these callers' failure, not the others'
            if len(joining) > 1:
                for job in joining:
                    self._join([job], live, batch)
                return
            log.warning("prefill failed: %s", error)
            joining[0].fail(error)
            return
        for job, (key, first) in zip(joining, added):
            live[key] = job
            self._deliver(key, job, first, live, batch)

    def _deliver(self, key: int, job: AnswerJob, token, live: dict, batch) -> None:
        if isinstance(token, BaseException):  # this row failed alone (the batch has let it go)
            job.fail(token)
            gated(batch.drop, key)
            del live[key]
            return
        if token == self.eos:
            job.end(eos=True)
        else:
            job.push(token)
            if job.count < job.settings.max_new_tokens:
                return
            job.end(eos=False)
        gated(batch.drop, key)
        del live[key]

    def _finish_all(self, live: dict, batch) -> None:
        """Shutting down: the rows still decoding run to their end (the server drains before this)."""
        while live:
            for key, token in gated(batch.step).items():
                self._deliver(key, live[key], token, live, batch)

    # ---- micro-batching ------------------------------------------------------------------------

    def _run_micro_batches(self) -> None:
        while True:
            jobs = [self.waiting.get()]
            while len(jobs) < self.max_rows:
                try:
                    jobs.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            stopping = any(job is STOP for job in jobs)
            jobs = [job for job in jobs if job is not STOP and not job.cancelled]
            self._in_hand = [jobs]
            groups: dict[GenerationSettings, list[AnswerJob]] = {}
            for job in jobs:
                groups.setdefault(job.settings, []).append(job)
            for settings, group in groups.items():
                self._generate_group(settings, group)
            if stopping:
                return

    def _generate_group(self, settings: GenerationSettings, group: list[AnswerJob]) -> None:
        self.running_rows = len(group)
        try:
            rows = gated(self.engine.generate, [job.prompt for job in group], settings, _rows_check(group),
                          *_adapter_arg([job.adapter for job in group], any(job.adapter for job in group)))
        except Exception as error:  # noqa: BLE001
            if len(group) > 1:  # one row's failure (its logits overflowed) is its request's alone
                for job in group:
                    self._generate_group(settings, [job])
                return
            log.warning("answer failed: %s", error)
            group[0].fail(error)
            return
        finally:
            self.running_rows = 0
        for job, row in zip(group, rows):
            for token in row.token_ids:
                job.push(token)
            self.on_tokens(len(row.token_ids))
            job.end(eos=row.finish_reason == "eos")


def gated(call, *args):
    """`call(*args)` as GPU work: never beside another stage's CUDA graph capture (gpu_gate.py)."""
    with GATE.work():
        return call(*args)


def _adapter_arg(adapter, given: bool | None = None) -> tuple:
    """The adapter argument, only where a row applies one (engines without adapters take none)."""
    return (adapter,) if (adapter if given is None else given) else ()


def _rows_check(group: list[AnswerJob]):
    """One stop check for a micro-batch: row i is checked by its own job's (one-row) check."""
    checks = [job.stop_check for job in group]
    if all(check is None for check in checks):
        return None
    return lambda row, ids: checks[row] is not None and checks[row](0, ids)
