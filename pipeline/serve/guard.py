"""Other web sites cannot use the server: an ASGI middleware that checks `Host` and `Origin` before
any route runs (Starlette's TrustedHostMiddleware splits `[::1]:8000` wrongly, answers in text and
can redirect; CORS headers and preflight are Starlette's CORSMiddleware, in app.py).

- `Host`, where no key is set: it must name loopback, the bound address or an allowed host, so a
  page whose own domain resolves to 127.0.0.1 (DNS rebinding) is refused.
- `Origin`, always: a browser sends it on a cross-site request; only the server's own page (same
  scheme-less host and port as `Host`) and the allowed origins may call.
- Framing: a request with both `Content-Length` and `Transfer-Encoding`, or HTTP/1.0 with
  `Transfer-Encoding` (which 1.0 does not have), is answered 400 and its connection closed, as RFC
  9112 6.1 and 6.3 ask (h11 would read it by its chunks and keep the connection: a front proxy that
  read the Content-Length would see another request in it).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}
# RFC 9110's Host: a bracketed IPv6 address or a name/IPv4 address of name characters, then an
# optional port of digits. Nothing else (no userinfo "@", no path) names a host.
HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]{0,5})?")
HOST_NAME_CHARS = re.compile(r"[a-z0-9.-]+")


def host_name(host: str) -> str:
    """The name or address in a Host header (port and IPv6 brackets removed), lower-cased; "" for a
    header that does not have Host's shape (`127.0.0.1:80@evil.example` names no host)."""
    host = host.strip().lower()
    found = HOST.fullmatch(host)
    if not found:
        return ""
    name = found.group(1)
    return name[1:-1] if name.startswith("[") else name


def is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class SiteGuard:
    def __init__(self, app, config):
        self.app = app
        self.config = config
        bound = (config.bound_host or "").strip("[]").lower()
        self.hosts = {name.lower() for name in config.allowed_hosts}
        if bound and bound not in ("0.0.0.0", "::"):
            self.hosts.add(bound)
        self.origins = {origin.rstrip("/").lower() for origin in config.cors_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        status, problem = 400, _framing_problem(scope, headers)
        if problem is None:
            status = 403
            if self.config.api_key is None and host and not self.host_allowed(host):
                problem = (f"this server is not {(host_name(host) or host.strip())[:80]!r}: the Host header must"
                           " name it (loopback or its own address)")
            elif "origin" in headers and not self.origin_allowed(headers["origin"], host):
                problem = f"requests from pages of {headers['origin'][:80]!r} are not allowed here"
        if problem is None:
            return await self.app(scope, receive, send)
        response = JSONResponse({"error": problem}, status_code=status, headers={"Connection": "close"})
        await response(scope, receive, send)

    def host_allowed(self, host: str) -> bool:
        name = host_name(host)
        if not name:
            return False
        plain = HOST_NAME_CHARS.fullmatch(name) or ":" in name  # a DNS name, an IPv4 or an IPv6 address
        return bool(plain) and (is_loopback_name(name) or name in self.hosts) or "*" in self.hosts

    def origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in self.origins or "*" in self.origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc == host.strip().lower()


def _framing_problem(scope, headers: Headers) -> str | None:
    if "transfer-encoding" not in headers:
        return None
    if "content-length" in headers:
        return "a request may not carry both Content-Length and Transfer-Encoding"
    if scope.get("http_version") == "1.0":
        return "HTTP/1.0 has no Transfer-Encoding: send Content-Length"
    return None
