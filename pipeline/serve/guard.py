"""Other web sites cannot use the server: an ASGI middleware that checks `Host` and `Origin` before
any route runs (Starlette's TrustedHostMiddleware splits `[::1]:8000` wrongly, answers in text and
can redirect; CORS headers and preflight are Starlette's CORSMiddleware, in app.py).

- `Host`, where no key is set: it must name loopback, the bound address or an allowed host, so a
  page whose own domain resolves to 127.0.0.1 (DNS rebinding) is refused.
- `Origin`, always: a browser sends it on a cross-site request; only the server's own page (same
  scheme-less host and port as `Host`) and the allowed origins may call.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


def host_name(host: str) -> str:
    """The name or address in a Host header (port and IPv6 brackets removed), lower-cased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


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
        problem = None
        if self.config.api_key is None and host and not self.host_allowed(host):
            problem = (f"this server is not {host_name(host)[:80]!r}: the Host header must name it"
                       " (loopback or its own address)")
        elif "origin" in headers and not self.origin_allowed(headers["origin"], host):
            problem = f"requests from pages of {headers['origin'][:80]!r} are not allowed here"
        if problem is None:
            return await self.app(scope, receive, send)
        await JSONResponse({"error": problem}, status_code=403, headers={"Connection": "close"})(scope, receive, send)

    def host_allowed(self, host: str) -> bool:
        name = host_name(host)
        return is_loopback_name(name) or name in self.hosts or "*" in self.hosts

    def origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in self.origins or "*" in self.origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc == host.strip().lower()
