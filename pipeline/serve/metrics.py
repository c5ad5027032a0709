"""Prometheus metrics of one server (its own registry, so several apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("bilingual_qa_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=self.registry)
        self.errors = Counter("bilingual_qa_errors", "HTTP responses with a 4xx or 5xx status, by endpoint and code",
                              ["endpoint", "code"], registry=self.registry)
        self.queue_depth = Gauge("bilingual_qa_queue_depth", "Model requests admitted and not yet finished",
                                 registry=self.registry)
        self.batch_rows = Gauge("bilingual_qa_batch_rows", "Rows in the running decode batch, by model",
                                ["model"], registry=self.registry)
        self.tokens = Counter("bilingual_qa_generated_tokens", "Answer tokens generated", registry=self.registry)
        self.cache_blocks = Gauge("bilingual_qa_cache_blocks", "Blocks of the paged answer cache, by model and"
                                  " state (used, free)", ["model", "state"], registry=self.registry)
        self.preemptions = Gauge("bilingual_qa_preemptions", "Rows preempted so far (blocks ran short; each"
                                 " resumed later), by model", ["model"], registry=self.registry)
        self.stage_seconds = Histogram("bilingual_qa_stage_seconds", "Seconds each pipeline stage took per request",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=self.registry)

    def count(self, endpoint: str, code: int) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        if code >= 400:
            self.errors.labels(endpoint, str(code)).inc()

    def observe(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def watch_batches(self, schedulers: dict) -> None:
        for name, scheduler in schedulers.items():
            self.batch_rows.labels(name).set_function(lambda s=scheduler: s.running_rows)
            if scheduler.cache_blocks() is None:
                continue  # no paged cache (transformers' engine, or micro-batching)
            for index, state in enumerate(("used", "free")):
                self.cache_blocks.labels(name, state).set_function(
                    lambda s=scheduler, i=index: (s.cache_blocks() or (0, 0))[i])
            self.preemptions.labels(name).set_function(lambda s=scheduler: s.decode_batch.preemptions)

    def render(self) -> bytes:
        return generate_latest(self.registry)
