"""`bilingual-qa serve`: the models loaded once behind an HTTP API and a web page (the `serve` extra).

The room sits above `qa`: nothing below imports it. Its modules import Starlette, uvicorn and
prometheus_client; this file does not, so the CLI can say what is missing in one line.
"""

from __future__ import annotations

import importlib.util

REQUIRED_MODULES = {"starlette": "starlette", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client",
                    "multipart": "python-multipart"}


def missing_requirements() -> list[str]:
    """The serve extra's packages that are not installed."""
    return [package for module, package in REQUIRED_MODULES.items() if importlib.util.find_spec(module) is None]


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
