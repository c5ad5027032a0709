"""Many callers, one model: each model stage runs on its own thread, batching what callers left waiting.

`AnswerScheduler` owns one answer engine. Where the engine can decode step by step
(llm/continuous.py), a question that arrives while others are decoding joins the running batch at the
next step and a finished or abandoned row leaves it at once (continuous batching). Otherwise every
question that arrived while the last batch ran goes into the next `generate` call (micro-batching).

`TranslationBatcher` owns one translator: the sentences of every waiting caller are translated
together, in rounds of a bounded size that every caller shares (a long document never holds the rest).

Callers live on the asyncio loop; results come back through `loop.call_soon_threadsafe` and
concurrent futures, so no stage ever runs on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Callable

from pipeline.gpu_gate import GATE
from pipeline.llm.continuous import open_decode_batch
from pipeline.llm.engine import GenerationSettings

log = logging.getLogger("bilingual_qa.serve")
_STOP = object()  # queued to end a stage's thread


class AnswerJob:
    """One question's generation: its tokens arrive on `events` as ("token", id), then ("end", eos)."""

    def __init__(self, prompt: list[int], settings: GenerationSettings, loop: asyncio.AbstractEventLoop,
                 stop_check: Callable | None = None):
        self.prompt = prompt
        self.settings = settings
        self.stop_check = stop_check  # used where the engine generates whole rows (micro-batching)
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.count = 0

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def push(self, token: int) -> None:
        self.count += 1
        self._put(("token", token))

    def end(self, eos: bool) -> None:
        self._put(("end", eos))

    def fail(self, error: BaseException) -> None:
        self._put(("error", error))

    def cancel(self) -> None:
        """The caller is gone or has what it needs: the row is freed at the next step."""
        self.cancelled = True


class AnswerScheduler:
    def __init__(self, engine, *, max_rows: int = 64, on_tokens: Callable[[int], None] | None = None,
                 batching: str = "auto"):
        self.engine = engine
        self.eos = engine.eos_token_id
        self.max_rows = max_rows
        self.on_tokens = on_tokens or (lambda n: None)
        self.waiting: queue.Queue = queue.Queue()
        self.running_rows = 0
        self.decode_batch = _gated(open_decode_batch, engine, max_rows, batching)  # may allocate its cache
        self.mode = "continuous" if self.decode_batch is not None else "micro-batch"
        target = self._run_continuous if self.decode_batch is not None else self._run_micro_batches
        self.thread = threading.Thread(target=self._guard(target), name=f"answer-{engine.name}", daemon=True)
        self.thread.start()

    def submit(self, job: AnswerJob) -> None:
        self.waiting.put(job)

    def close(self) -> None:
        self.waiting.put(_STOP)
        self.thread.join(timeout=30)

    def _guard(self, target):
        def run():
            try:
                target()
            except Exception:  # noqa: BLE001 - a dead engine thread must be loud in the log
                log.exception("the answer engine thread stopped")
        return run

    # ---- continuous batching -------------------------------------------------------------------

    def _run_continuous(self) -> None:
        batch = self.decode_batch
        live: dict[int, AnswerJob] = {}
        while True:
            while len(live) < batch.max_rows:
                try:
                    job = self.waiting.get(block=not live)
                except queue.Empty:
                    break
                if job is _STOP:
                    self._finish_all(live, batch)
                    return
                if job.cancelled:
                    continue
                try:
                    key, first = _gated(batch.add, job.prompt, job.settings)
                except Exception as error:  # noqa: BLE001 - this caller's failure, not the others'
                    log.exception("prefill failed")
                    job.fail(error)
                    continue
                live[key] = job
                self._deliver(key, job, first, live, batch)
            for key in [key for key, job in live.items() if job.cancelled]:
                _gated(batch.drop, key)
                del live[key]
            self.running_rows = len(live)
            if not live:
                continue
            try:
                tokens = _gated(batch.step)
            except Exception as error:  # noqa: BLE001 - fail the rows of this batch, keep serving
                log.exception("decode step failed")
                for key, job in list(live.items()):
                    job.fail(error)
                    _gated(batch.drop, key)
                live.clear()
                continue
            self.on_tokens(len(tokens))
            for key, token in tokens.items():
                self._deliver(key, live[key], token, live, batch)
            self.running_rows = len(live)

    def _deliver(self, key: int, job: AnswerJob, token: int, live: dict, batch) -> None:
        if token == self.eos:
            job.end(eos=True)
        else:
            job.push(token)
            if job.count < job.settings.max_new_tokens:
                return
            job.end(eos=False)
        _gated(batch.drop, key)
        del live[key]

    def _finish_all(self, live: dict, batch) -> None:
        """Shutting down: the rows still decoding run to their end (the server drains before this)."""
        while live:
            for key, token in _gated(batch.step).items():
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
            stopping = any(job is _STOP for job in jobs)
            jobs = [job for job in jobs if job is not _STOP and not job.cancelled]
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
            rows = _gated(self.engine.generate, [job.prompt for job in group], settings, _rows_check(group))
        except Exception as error:  # noqa: BLE001
            log.exception("generate failed")
            for job in group:
                job.fail(error)
            return
        finally:
            self.running_rows = 0
        for job, row in zip(group, rows):
            for token in row.token_ids:
                job.push(token)
            self.on_tokens(len(row.token_ids))
            job.end(eos=row.finish_reason == "eos")


def _gated(call, *args):
    """`call(*args)` as GPU work: never beside another stage's CUDA graph capture (gpu_gate.py)."""
    with GATE.work():
        return call(*args)


def _rows_check(group: list[AnswerJob]):
    """One stop check for a micro-batch: row i is checked by its own job's (one-row) check."""
    checks = [job.stop_check for job in group]
    if all(check is None for check in checks):
        return None
    return lambda row, ids: checks[row] is not None and checks[row](0, ids)


class StageStopped(RuntimeError):
    """A stage's thread has stopped: the server cannot answer until it is restarted."""


class _Translation:
    """One caller's pieces and where their translations stand."""

    def __init__(self, ids: list[list[int]], beams: int | None, future: Future):
        self.ids, self.beams, self.future = ids, beams, future
        self.out: list[str] = []
        self.skipped = False  # left out of the last round (by callers that could finish in it)

    @property
    def left(self) -> int:
        return len(self.ids) - len(self.out)


class TranslationBatcher:
    """One translator, two threads. A caller whose pieces fit one round (a question, a short text) goes
    to the quick lane, so it never waits behind a document; longer ones go to the bulk lane. Each
    lane puts its callers' pieces into `translate_ids` calls (rounds) of at most `round_pieces`
    pieces, every caller getting a piece of each round and the callers that can finish filling the
    rest (`_share_round`): two documents share the bulk lane, many questions the quick one."""

    def __init__(self, translator, *, on_batch: Callable[[int], None] | None = None, round_pieces: int = 16):
        self.translator = translator
        self.on_batch = on_batch or (lambda n: None)
        self.round_pieces = round_pieces
        self.plan_lock = threading.Lock()  # the tokenizer and the memory: one plan or assembly at a time
        name = f"translate-{translator.target_lang}"
        self.waiting: queue.Queue = queue.Queue()  # the bulk lane
        self.quick: queue.Queue = queue.Queue()
        self.active: list[_Translation] = []  # the bulk lane's callers, round by round
        self.quick_active: list[_Translation] = []
        self.thread = threading.Thread(target=self._guarded, args=(self.waiting, self.active), name=name, daemon=True)
        self.quick_thread = threading.Thread(target=self._guarded, args=(self.quick, self.quick_active),
                                             name=f"{name}-quick", daemon=True)
        self.thread.start()
        self.quick_thread.start()

    @property
    def threads(self) -> list[threading.Thread]:
        return [self.thread, self.quick_thread]

    def submit(self, ids: list[list[int]], num_beams: int | None = None) -> Future:
        future: Future = Future()
        quick = len(ids) <= self.round_pieces
        lane, thread = (self.quick, self.quick_thread) if quick else (self.waiting, self.thread)
        if not ids:
            future.set_result([])
        elif not thread.is_alive():
            future.set_exception(StageStopped(f"the {thread.name} stage has stopped"))
        else:
            lane.put(_Translation(ids, num_beams, future))
        return future

    async def plan(self, texts: list[str], num_beams: int | None = None):
        """`Translator.plan`, off the event loop (a long document takes a while), one at a time."""
        return await asyncio.to_thread(self._locked, self.translator.plan, texts, num_beams)

    async def assemble(self, plan, pieces: list[str]) -> list[str]:
        return await asyncio.to_thread(self._locked, self.translator.assemble, plan, pieces)

    async def translate(self, texts: list[str], num_beams: int | None = None) -> list[str]:
        plan = await self.plan(texts, num_beams)
        return await self.assemble(plan, await asyncio.wrap_future(self.submit(plan.ids, num_beams)))

    def _locked(self, call, *args):
        with self.plan_lock:
            return call(*args)

    @property
    def busy(self) -> bool:
        return bool(self.active)

    def close(self) -> None:
        for lane in (self.waiting, self.quick):
            lane.put(_STOP)
        for thread in self.threads:
            thread.join(timeout=30)

    def _guarded(self, waiting: queue.Queue, active: list[_Translation]) -> None:
        try:
            self._run(waiting, active)
        except BaseException:  # noqa: BLE001 - a dead stage must be loud and must not hang its callers
            log.exception("the %s thread stopped", threading.current_thread().name)
            failure = StageStopped(f"the {threading.current_thread().name} stage has stopped")
            while True:
                try:
                    active.append(waiting.get_nowait())
                except queue.Empty:
                    break
            for job in active:
                if job is not _STOP and not job.future.done():
                    job.future.set_exception(failure)

    def _run(self, waiting: queue.Queue, active: list[_Translation]) -> None:
        stopping = False
        while not stopping or active:
            while not stopping:
                try:
                    job = waiting.get(block=not active)
                except queue.Empty:
                    break
                if job is _STOP:
                    stopping = True
                elif job.future.set_running_or_notify_cancel():  # False: the caller left before it began
                    active.append(job)
            active[:] = [job for job in active if not job.future.done()]
            if active:
                self._translate_round(active)

    def _translate_round(self, active: list[_Translation]) -> None:
        beams = active[0].beams
        taken = _share_round([job for job in active if job.beams == beams], self.round_pieces)
        flat = [ids for job, count in taken for ids in job.ids[len(job.out):len(job.out) + count]]
        self.on_batch(len(flat))
        try:
            out = _gated(self.translator.translate_ids, flat, beams)
        except Exception as error:  # noqa: BLE001 - one caller's bad piece must not fail the others
            if len(taken) == 1:
                taken[0][0].future.set_exception(error)
                active.remove(taken[0][0])
                return
            for job, count in taken:  # again, one caller at a time, to find whose piece it is
                try:
                    job.out.extend(_gated(self.translator.translate_ids,
                                          job.ids[len(job.out):len(job.out) + count], beams))
                except Exception as own:  # noqa: BLE001
                    job.future.set_exception(own)
            out = None
        if out is not None:
            position = 0
            for job, count in taken:
                job.out.extend(out[position:position + count])
                position += count
        for job, _ in taken:
            if not job.future.done() and job.left == 0:
                job.future.set_result(job.out)  # running futures cannot be cancelled: no InvalidStateError
        active.append(active.pop(0))  # the next round starts with another caller


def _share_round(jobs: list[_Translation], budget: int) -> list[tuple[_Translation, int]]:
    """How many pieces each job gives this round. The jobs that can finish in it go first, whole,
    fewest pieces first: a question's few sentences are not slowed by a document's in the same call.
    A job left out once is in the next round, with at least one piece; with no job finishing, the
    budget goes to the jobs in turn, so a long document fills the rounds nobody else needs."""
    finishing = sorted((job for job in jobs if job.left <= budget), key=lambda job: job.left)
    counts: dict[int, int] = {}
    room = budget
    for job in finishing:
        if job.left <= room:
            counts[id(job)] = job.left
            room -= job.left
    for job in jobs:
        if id(job) not in counts and room > 0 and (not counts or job.skipped):
            counts[id(job)] = 1
            room -= 1
    for job in jobs:
        if id(job) in counts and room > 0 and not finishing:
            extra = min(room, job.left - counts[id(job)])
            counts[id(job)] += extra
            room -= extra
    for job in jobs:
        job.skipped = id(job) not in counts
    return [(job, counts[id(job)]) for job in jobs if id(job) in counts]
