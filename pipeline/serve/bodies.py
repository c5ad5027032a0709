"""Reading a request: the key (from the headers before any body byte is read, where the route takes
it there), then the body, bounded, and its fields from JSON, a form or multipart.

A refused caller costs almost nothing: a wrong or missing bearer token or query key is a 401 on the
headers alone, and a body that must carry the key (LibreTranslate's `api_key` field, the only way
its clients may send one) is not parsed unless it spells `api_key` at all. Parsing that can take a
while (a large body, a deep or wide one) runs on the server's parse pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import re
from concurrent.futures import Executor
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from pipeline.serve.http import HTTPError, State, shown

DISCARD_LIMIT = 16 * 2**20  # an over-long body is read (and dropped) up to this, so the client sees the 413
MAX_DEPTH = 32  # JSON nesting: the APIs need 4 (messages -> message -> content -> part)
MAX_INT_DIGITS = 40  # a 128-bit integer has 39
MAX_FORM_FIELDS = 1000
# Arrays and objects in one JSON body: the APIs need a few hundred at most (q's texts, messages and
# their parts); a megabyte of [] (330,000 lists) took seconds of the parser, which no thread interrupts.
MAX_CONTAINERS = 10_000
PARSE_INLINE_BYTES = 16_384  # smaller bodies parse in microseconds: on the loop; larger ones on the parse pool
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_SURROGATE = re.compile("[\ud800-\udfff]")
# A lone surrogate can reach a parsed value only through a JSON escape (\ud800-\udfff), since raw
# surrogate bytes are not UTF-8: a body without such an escape needs no search of its strings.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Only a body with a run of more than MAX_INT_DIGITS digits can hold a too-long integer: the others
# parse without a Python call per integer.
_LONG_DIGITS = re.compile(rb"[0-9]{%d}" % (MAX_INT_DIGITS + 1))
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")
NEEDS_KEY = "an API key is needed: send 'Authorization: Bearer KEY'"


# ---- the key ---------------------------------------------------------------------------------------

def given_key(request: Request) -> str | None:
    """The key the headers carry: a bearer token, else an `api_key` query parameter (its name
    percent-decoded, as every client's URL library writes it). None when neither is there."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query_params.get("api_key")


def key_matches(given: str | None, key: str) -> bool:
    """`given` is the key, compared as SHA-256 digests: equal length, so no timing by length."""
    if not given or not given.strip():
        return False
    return hmac.compare_digest(_digest(given), _digest(key))


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def check_header_key(request: Request, state: State, body_key: bool) -> bool:
    """Refuses (401) a wrong key in the headers, or a missing one where the route takes no body key,
    before any body byte is read. True when the body's `api_key` field must still be checked."""
    key = state.config.api_key
    if key is None:
        return False
    given = given_key(request)
    authorization = request.headers.get("authorization")
    if given is not None or (authorization and not body_key):
        if not key_matches(given, key):
            raise HTTPError(401, "the API key is wrong" if given and given.strip() else _needs_key(body_key))
        return False
    if not body_key:
        raise HTTPError(401, _needs_key(body_key))
    return True


def check_body_key(fields: dict, state: State) -> None:
    given = fields.get("api_key")
    if not isinstance(given, str) or not given.strip():
        raise HTTPError(401, _needs_key(True))
    if not key_matches(given, state.config.api_key):
        raise HTTPError(401, "the API key is wrong")


def _needs_key(body_key: bool) -> str:
    return NEEDS_KEY + (" or an api_key field" if body_key else "")


# ---- the body ----------------------------------------------------------------------------------------

async def read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 once it passes `limit`: the rest is read and dropped (up to DISCARD_LIMIT) so
    that a client which sends the whole body before reading, as urllib, requests and httpx do, reads
    the 413 instead of a reset connection; then the connection is closed."""
    close = {"Connection": "close"}
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit and (
            int(declared) > DISCARD_LIMIT or request.headers.get("expect", "").lower() == "100-continue"):
        raise HTTPError(413, f"the body is {declared} bytes; the limit is {limit}", close)  # nothing sent yet
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > DISCARD_LIMIT:
                break
    except ClientDisconnect:
        raise HTTPError(499, "the client closed the connection") from None
    if size > limit:
        raise HTTPError(413, f"the body is over the limit of {limit} bytes", close)
    return b"".join(chunks)


async def read_fields(request: Request, state: State, forms: bool = False, key_in_body: bool = False) -> dict:
    """The body as a dict: JSON from application/json only (so no other site's page can send it in a
    plain form); form-encoded and multipart bodies too where `forms` (the LibreTranslate endpoints).
    With `key_in_body`, a body that does not hold the word api_key is refused before it is parsed."""
    body = await read_body(request, state.config.max_body)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if key_in_body and b"api_key" not in body:
        raise HTTPError(401, _needs_key(True))
    if not body.strip():
        return {}
    if forms and kind == "multipart/form-data":
        return _checked(await _multipart_pairs(request, body))
    if not (forms and kind in FORM_TYPES) and kind != "application/json":
        accepted = "application/json, application/x-www-form-urlencoded or multipart/form-data" if forms \
            else "application/json"
        raise HTTPError(415, f"send the body as {accepted} (Content-Type), not {shown(kind or 'none')}")
    parse = _form_fields if kind in FORM_TYPES else _json_fields
    if len(body) <= PARSE_INLINE_BYTES:
        return parse(body)
    return await _off_the_loop(state.parse_pool, parse, body)


async def _off_the_loop(pool: Executor, call, *args):
    return await asyncio.get_running_loop().run_in_executor(pool, call, *args)


def _json_fields(body: bytes) -> dict:
    shape = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKET)  # its brackets outside strings
    if len(shape) > 2 * MAX_CONTAINERS:
        raise HTTPError(400, f"the body holds more than {MAX_CONTAINERS} JSON arrays and objects")
    hooks = {"parse_int": _short_int} if _LONG_DIGITS.search(body) else {}
    try:
        fields = json.loads(body, parse_constant=_no_constant, parse_float=_finite_float, **hooks)
    except RecursionError:
        raise HTTPError(400, f"the body is not valid JSON (nested deeper than {MAX_DEPTH})") from None
    except ValueError as error:  # JSONDecodeError, bad UTF-8, and the parse hooks' refusals
        raise HTTPError(400, f"the body is not valid JSON ({str(error)[:120]})") from None
    if not isinstance(fields, dict):
        raise HTTPError(400, "the body must be a JSON object")
    if _nested_deeper(shape, MAX_DEPTH):
        raise HTTPError(400, f"the body is nested deeper than {MAX_DEPTH}")
    if _SURROGATE_ESCAPE.search(body):
        _check_values(fields)
    return fields


def _nested_deeper(shape: bytes, depth: int) -> bool:
    """Whether the brackets of a valid JSON body (`shape`) nest deeper than `depth`: the innermost
    pairs removed once per level, in C-speed passes (a Python walk of the parsed values took seconds)."""
    for _ in range(depth):
        shape = _EMPTY_PAIR.sub(b"", shape)
        if not shape:
            return False
    return True


def _form_fields(body: bytes) -> dict:
    """A urlencoded form's fields; its percent escapes must decode to UTF-8, as a raw body must."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS,
                          encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise HTTPError(400, "the form body is not valid UTF-8 (its percent escapes included)") from None
    except ValueError:
        raise HTTPError(400, f"the form has more than {MAX_FORM_FIELDS} fields") from None
    return _checked(pairs)


async def _multipart_pairs(request: Request, body: bytes) -> list[tuple[str, str]]:
    request._body = body  # the stream is spent; Starlette's form parser reads the cached body
    try:
        form = await request.form(max_files=0, max_fields=MAX_FORM_FIELDS)
    except (HTTPException, ValueError) as error:
        raise HTTPError(400, f"the multipart body cannot be read ({getattr(error, 'detail', error)})") from None
    return [(key, value) for key, value in form.multi_items() if isinstance(value, str)]


def _checked(pairs: list[tuple[str, str]]) -> dict:
    """A form's fields, a field sent twice as a list (so that a string field refuses it)."""
    fields: dict = {}
    for key, value in pairs:
        fields[key] = [*fields[key], value] if isinstance(fields.get(key), list) else \
            [fields[key], value] if key in fields else value
    _check_values(fields)
    return fields


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is too large a number")
    return value


def _short_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits is too long")
    return int(text)


def _check_values(fields: dict) -> None:
    """Every string valid Unicode (a lone surrogate cannot be encoded again) and no nesting deeper
    than MAX_DEPTH (a form's fields are flat; JSON's depth is `_nested_deeper`'s)."""
    todo = [(fields, 1)]
    while todo:
        value, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise HTTPError(400, f"the body is nested deeper than {MAX_DEPTH}")
        pairs = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in pairs:
            if (type(key) is str and _SURROGATE.search(key)) or (type(item) is str and _SURROGATE.search(item)):
                raise HTTPError(400, f"{shown(key) if isinstance(key, str) else 'a value'} holds a lone"
                                     " surrogate (\\ud800-\\udfff): send valid Unicode text")
            if type(item) is dict or type(item) is list:
                todo.append((item, depth + 1))
