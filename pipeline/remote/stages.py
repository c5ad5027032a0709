"""Stand-ins for the stages, backed by a server, for the batch jobs of jobs/workers.py: the same
`translate_file`, `translate_document_file` and `ask_file` (the same runner, readers, writers,
document parsers and fingerprints) run with these in place of a loaded Translator or BilingualQA,
so a job through a server keeps every guarantee of a local one. Each chunk's rows go to the server `concurrency` requests at a time, in order.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from pipeline.errors import BilingualQAError
from pipeline.remote.client import ServerClient
from pipeline.spec import GenerationSettings
from pipeline.text.detect import other_language
from pipeline.text.result import QAResult

# Bytes of texts per /translate request, well under the server's default --max-body of 1 MB, and
# texts per request: the server's default --batch-limit (a chunk of 512 rows or a document's segments
# on one connection would otherwise be refused, then sent one text at a time).
MAX_REQUEST_BYTES = 200_000
MAX_REQUEST_TEXTS = 128
DEFAULT_CONCURRENCY = 8  # a server too old to say its batch size


def server_batch_size(client: ServerClient) -> int:
    """The server's --max-batch (from /health): the default rows in flight of a job. Asking also
    tells an unreachable or still-loading server before the first row."""
    health = client.health()
    size = health.get("max_batch") if isinstance(health, dict) else None
    return size if isinstance(size, int) and size >= 1 else DEFAULT_CONCURRENCY


def _connect(url: str, key: str | None, concurrency: int | None) -> tuple[ServerClient, int]:
    probe = ServerClient(url, key, connections=1)
    try:
        rows = concurrency or server_batch_size(probe)
    finally:
        probe.close()
    return ServerClient(url, key, connections=rows), rows


class RemoteTranslator:
    """`translate(texts)` into `target_lang` on the server; a 400 (a text the model refuses) raises
    the BilingualQAError the worker then pins on its row, as with a local translator."""

    def __init__(self, url: str, target_lang: str, *, beams: int | None = None, concurrency: int | None = None,
                 key: str | None = None):
        self.client, concurrency = _connect(url, key, concurrency)
        self.target_lang, self.beams, self.concurrency = target_lang, beams, concurrency
        self.source_lang = other_language(target_lang)
        self.memory = None  # the server keeps the translation memory: this side counts none
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="translate-remote")

    def translate(self, texts: list[str]) -> list[str]:
        groups = _groups(texts, self.concurrency)
        done = self.pool.map(lambda group: self.client.translate(group, self.source_lang, self.target_lang,
                                                                 self.beams), groups)
        return [text for group in done for text in group]


class RemoteQA:
    """`ask_batch` on the server: each question its own /v1/ask request (the server batches them
    across callers), `concurrency` in flight; a 400 is that question's error, in its place."""

    def __init__(self, url: str, *, model: str | None = None, beams: int | None = None,
                 concurrency: int | None = None, key: str | None = None):
        self.client, concurrency = _connect(url, key, concurrency)
        self.model, self.beams = model, beams
        self.ja_en = self.en_ja = None  # the server's stages: no memory of this side's to count
        self.preferred_batch_rows = concurrency * 4  # a group keeps every connection busy
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="ask-remote")

    def ask_batch(self, texts: list[str], *, source_lang: str | None = None,
                  settings: GenerationSettings = GenerationSettings()) -> list[QAResult | BilingualQAError]:
        return list(self.pool.map(lambda text: self._ask_one(text, source_lang, settings), texts))

    def _ask_one(self, text: str, source_lang: str | None, settings: GenerationSettings):
        try:
            return QAResult.from_dict(self.client.ask(ask_fields(text, source_lang, settings, self.model, self.beams)))
        except BilingualQAError as error:
            return error


def ask_fields(question: str, source_lang: str | None, settings: GenerationSettings, model: str | None,
               beams: int | None) -> dict:
    """The body of /v1/ask for what `ask` was given."""
    fields = {"question": question, "max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
              "top_p": settings.top_p, "raw": settings.raw}
    optional = {"source_lang": source_lang, "seed": settings.seed, "model": model, "beams": beams}
    return fields | {name: value for name, value in optional.items() if value is not None}


def _groups(texts: list[str], concurrency: int) -> list[list[str]]:
    """The texts cut into about `concurrency` requests of consecutive texts, each under MAX_REQUEST_BYTES
    and MAX_REQUEST_TEXTS."""
    if not texts:
        return []
    per_group = min(-(-len(texts) // concurrency), MAX_REQUEST_TEXTS)
    groups, group, size = [], [], 0
    for text in texts:
        length = len(text.encode("utf-8", "surrogatepass"))
        if group and (len(group) >= per_group or size + length > MAX_REQUEST_BYTES):
            groups.append(group)
            group, size = [], 0
        group.append(text)
        size += length
    return groups + [group]
