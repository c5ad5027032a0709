"""A job's chunks on the workers of a Dask cluster: one worker per GPU, each holding its models once.

The driver (the process that runs the job) reads the input, sends chunks to the workers, and takes
their outcomes back in input order, holding those that finish early until the chunks before them
are in: it alone writes the output, holds its lock and commits, exactly as with one process, so
the output is byte for byte the same. A worker that dies has its chunk run again on another by
the scheduler; a driver that dies leaves nothing committed that a resumed run would not redo.

A local cluster's workers are children of the driver, each pinned to one GPU with
CUDA_VISIBLE_DEVICES (the nanny's per-worker environment, as dask-cuda does it), and exit when the
driver does, even after kill -9 (distributed's worker processes watch a pipe from their parent).
Workers of an existing cluster (`cluster=ADDRESS`) run chunks only; they never touch the files.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import os
import uuid
from typing import Callable

from pipeline.errors import JobError
from pipeline.jobs.runner import Worker, good_texts

CONNECT_SECONDS = 30
WORKERS_START_SECONDS = 180
# Chunks in flight per worker: one running, one waiting, so a worker never idles between chunks.
CHUNKS_PER_WORKER = 2

_held: dict[str, Worker] = {}  # on a worker process: the current job's worker, models loaded


def run_chunk(key: str, make_worker: Callable[[], Worker], texts: list[str]):
    """Runs on a cluster worker: the job's models load at its first chunk and stay for the next."""
    worker = _held.get(key)
    if worker is None:
        _held.clear()  # another job's models: free them before loading this one's
        worker = _held[key] = make_worker()
    return worker(texts, None)


def gpu_devices() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (visible or [str(i) for i in range(torch.cuda.device_count())])[:torch.cuda.device_count()]


def worker_count(workers: int | str | None) -> int:
    """`auto`: one worker per GPU, or one on a machine without a GPU."""
    if workers in (None, "auto"):
        return max(1, len(gpu_devices()))
    try:
        count = int(workers)
    except ValueError:
        raise JobError(f"--workers {workers}: give a number of workers or auto") from None
    if count < 1:
        raise JobError("--workers must be at least 1")
    return count


def local_cluster(count: int):
    """`count` worker processes, one GPU each where there are GPUs."""
    from distributed import Nanny, Scheduler, SpecCluster

    devices = gpu_devices()
    if devices and count > len(devices):
        raise JobError(f"--workers {count}: this machine has {len(devices)} GPU(s), and a worker takes one")
    quiet = logging.ERROR
    workers = {
        f"worker-{i}": {"cls": Nanny, "options": {
            "nthreads": 1,  # one chunk at a time: a worker's models serve one batch at a time
            "memory_limit": 0,  # the models' memory is the GPU's; no host-memory watchdog kills
            "silence_logs": quiet,
            "env": {"CUDA_VISIBLE_DEVICES": devices[i]} if devices else {},
        }} for i in range(count)
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": False, "dashboard_address": None}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=quiet, name="bilingual-qa")


class DaskChunks:
    """Chunks run on a Dask cluster's workers; outcomes come back in input order."""

    def __init__(self, make_worker: Callable[[], Worker], key: str, *, workers: int, address: str | None):
        import cloudpickle

        # Workers keep models under this key: the job's options and the recipe that loads them.
        recipe = hashlib.sha256(cloudpickle.dumps(make_worker)).hexdigest()
        self.make_worker, self.key = make_worker, f"{key}-{recipe}"
        self.workers, self.address = workers, address
        self.cluster = self.client = None

    def __enter__(self) -> "DaskChunks":
        from distributed import Client

        try:
            if self.address is None:
                self.cluster = local_cluster(self.workers)
                self.client = Client(self.cluster)
                self.client.wait_for_workers(self.workers, timeout=WORKERS_START_SECONDS)
            else:
                self.client = Client(self.address, timeout=CONNECT_SECONDS)
                self.workers = max(1, len(self.client.nthreads()))
        except (OSError, TimeoutError) as error:
            self.__exit__()
            where = f"the Dask scheduler at {self.address}" if self.address else "a local Dask cluster"
            raise JobError(f"cannot start the job on {where}: {error}") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None

    def run(self, chunks, report):
        pending: collections.deque = collections.deque()
        job = uuid.uuid4().hex[:8]
        try:
            for chunk in chunks:
                texts = good_texts(chunk)
                future = self.client.submit(run_chunk, self.key, self.make_worker, texts, pure=False,
                                            key=f"chunk-{job}-line-{chunk[0].line}") if texts else None
                pending.append((chunk, future))
                if len(pending) >= CHUNKS_PER_WORKER * self.workers:
                    yield self._result(*pending.popleft())
            while pending:
                yield self._result(*pending.popleft())
        finally:
            for _, future in pending:
                if future is not None:
                    future.cancel()

    @staticmethod
    def _result(chunk, future):
        from distributed import KilledWorker

        if future is None:
            return chunk, []
        try:
            return chunk, future.result()
        except KilledWorker:
            raise JobError(f"the workers died again and again on the chunk from line {chunk[0].line}; "
                           "run the job again to resume it") from None


def dask_runner(workers: int | str | None, cluster: str | None):
    """The runner of a job on a local cluster of `workers` workers, or on the cluster at `cluster`."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise JobError("--workers and --cluster need Dask: pip install 'bilingual-qa[distributed]'") from None
    count = worker_count(workers)
    return functools.partial(DaskChunks, workers=count, address=cluster)
