"""`TranslationBatcher` owns one translator: the sentences of every waiting caller are translated
together, in rounds of a bounded size that every caller shares (a long document never holds the rest).

Like the answer stage (batching.py), it runs on threads of its own; callers on the asyncio loop get
their results through concurrent futures, so no stage ever runs on the loop. Each caller's plan
(sentence splitting, cutting, tokenising) and assembly run on a planner thread of its lane, beside
the others' (the tokenizer is only read and the memory keeps its own lock), so a question's plan
never waits for a document's. A caller that goes abandons its future: its pieces leave the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from pipeline.serve.batching import _STOP, StageStopped, _gated, log


BULK_NICENESS = 10
QUICK_PLAN_CHARS = 16_000  # texts up to this (a question, an answer) are planned on the quick lane's planner


class TranslationFuture(Future):
    """A caller's translation. Cancelling it (as asyncio does when the awaiting task is cancelled)
    abandons it even once its pieces are being translated: the batcher drops it before the next round."""

    abandoned = False

    def cancel(self) -> bool:
        self.abandoned = True
        return super().cancel()


class _Translation:
    """One caller's pieces and where their translations stand."""

    def __init__(self, ids: list[list[int]], beams: int | None, future: TranslationFuture):
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
        self.planners = {lane: ThreadPoolExecutor(1, thread_name_prefix=f"plan-{translator.target_lang}-{lane}",
                                                  initializer=_background if lane == "bulk" else None)
                         for lane in ("quick", "bulk")}
        # The lanes translate at once where the backend allows it; the fast backend's graphs hold one
        # set of buffers per shape, so there a lane waits for the other's round (at most round_pieces).
        # Taken outside the GPU gate: a capture inside a round waits for the other lanes' GPU work.
        concurrent = getattr(getattr(translator, "backend", None), "concurrent", True)
        self.one_at_a_time = contextlib.nullcontext() if concurrent else threading.Lock()
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

    def submit(self, ids: list[list[int]], num_beams: int | None = None) -> TranslationFuture:
        future = TranslationFuture()
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
        """`Translator.plan` on a planner thread: the quick lane's for short texts, else the bulk lane's."""
        return await self._planned(_lane_of(texts), self.translator.plan, texts, num_beams)

    async def assemble(self, plan, pieces: list[str]) -> list[str]:
        return await self._planned(_lane_of(plan.sentences), self.translator.assemble, plan, pieces)

    async def translate(self, texts: list[str], num_beams: int | None = None) -> list[str]:
        """The texts translated; cancelling it (the caller went) abandons its pieces."""
        plan = await self.plan(texts, num_beams)
        return await self.assemble(plan, await asyncio.wrap_future(self.submit(plan.ids, num_beams)))

    async def _planned(self, lane: str, call, *args):
        return await asyncio.get_running_loop().run_in_executor(self.planners[lane], call, *args)

    @property
    def busy(self) -> bool:
        return bool(self.active)

    def close(self) -> None:
        for lane in (self.waiting, self.quick):
            lane.put(_STOP)
        for planner in self.planners.values():
            planner.shutdown(wait=False, cancel_futures=True)
        for thread in self.threads:
            thread.join(timeout=30)

    def _guarded(self, waiting: queue.Queue, active: list[_Translation]) -> None:
        if waiting is self.waiting:
            _background()
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
            _drop_abandoned(active)
            if active:
                self._translate_round(active)

    def _translate_ids(self, ids: list[list[int]], beams: int) -> list[str]:
        """One batch through the translator: alone where its backend is not concurrent, as GPU work."""
        with self.one_at_a_time:
            return _gated(self.translator.translate_ids, ids, beams)

    def _translate_round(self, active: list[_Translation]) -> None:
        beams = active[0].beams
        taken = _share_round([job for job in active if job.beams == beams], self.round_pieces)
        flat = [ids for job, count in taken for ids in job.ids[len(job.out):len(job.out) + count]]
        self.on_batch(len(flat))
        try:
            out = self._translate_ids(flat, beams)
        except Exception as error:  # noqa: BLE001 - one caller's bad piece must not fail the others
            if len(taken) == 1:
                taken[0][0].future.set_exception(error)
                active.remove(taken[0][0])
                return
            for job, count in taken:  # again, one caller at a time, to find whose piece it is
                try:
                    job.out.extend(self._translate_ids(job.ids[len(job.out):len(job.out) + count], beams))
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


def _background() -> None:
    """The calling thread (the bulk lane's, its planner's) yields the CPU to the others where cores
    are short: Linux keeps a nice value per thread."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BULK_NICENESS)
        except OSError:
            pass


def _lane_of(texts: list[str]) -> str:
    return "quick" if sum(len(text) for text in texts) <= QUICK_PLAN_CHARS else "bulk"


def _drop_abandoned(active: list[_Translation]) -> None:
    """The jobs done or abandoned leave: an abandoned one that was running is ended here (nobody reads it)."""
    for job in active:
        if job.future.abandoned and not job.future.done():
            job.future.set_exception(asyncio.CancelledError())
    active[:] = [job for job in active if not job.future.done()]


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
