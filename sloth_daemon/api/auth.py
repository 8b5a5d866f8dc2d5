"""The HTTP API key: checking it in constant time, and keeping it (and other secrets) out of the access log.

Contract:
- `bearer_key_matches(header, key)`: whether an `Authorization` header value carries `key` with the `Bearer`
  scheme. The scheme is case-insensitive (RFC 9110 §11.1: auth schemes are case-insensitive; `bearer` from RFC
  6750); the key is compared as bytes with `hmac.compare_digest`, so the time taken says nothing about how much of
  a guess was right.
- `key_exempt(request, cfg)`: the paths that never need the key: `/health`, the status page's static files (`/`,
  `/ui/...`: no data in them; the page sends the key with its API calls), and `/metrics` from a loopback client
  when `metrics_open_on_loopback` is set (a Prometheus on the same host scraping without the key).
- `SecretRedactor(get_key)`: a `logging.Filter` for uvicorn's access logger (`uvicorn.access`). Keys are never
  taken from a query string, but clients send them there anyway (`?api_key=...`), and the access log records every
  request line. It replaces the values of secret-looking query parameters (`SECRET_PARAMS`) and any occurrence of
  the configured key (`get_key()`, read per record: a SIGHUP reload may change it) with `REDACTED`, keeping the
  record's argument tuple in shape (uvicorn's formatter unpacks it).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from typing import Any, Callable
from urllib.parse import quote, quote_plus

REDACTED = "REDACTED"
SECRET_PARAMS = re.compile(
    r"(?i)([?&](?:[a-z0-9_.-]*(?:key|token|secret|password|passwd|auth|signature|sig|credential)[a-z0-9_.-]*)=)"
    r"[^&#\s\"]*"
)


def key_exempt(request: Any, cfg: Any) -> bool:
    """Does this request go through without the API key? (See the module docstring.)"""
    path = request.url.path
    if path in ("/health", "/") or path.startswith("/ui/"):
        return True
    if path == "/metrics" and cfg.metrics_open_on_loopback:
        host = request.client.host if request.client else ""
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False
    return False


def bearer_key_matches(header: str | None, key: str) -> bool:
    """Does the `Authorization` header value `header` (as Starlette gives it: latin-1 decoded) carry `key`?"""
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # The header's raw bytes (Starlette decodes headers as latin-1) against the key's UTF-8 bytes.
    return hmac.compare_digest(token.strip().encode("latin-1", "replace"), key.encode("utf-8", "surrogatepass"))


class SecretRedactor(logging.Filter):
    """Redacts secrets from the request lines in access-log records (see the module docstring)."""

    def __init__(self, get_key: Callable[[], str | None]):
        super().__init__()
        self.get_key = get_key

    def redact(self, text: str) -> str:
        text = SECRET_PARAMS.sub(r"\1" + REDACTED, text)
        key = self.get_key()
        if key:
            for form in {key, quote(key, safe=""), quote_plus(key)}:
                text = text.replace(form, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.redact(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        return True
