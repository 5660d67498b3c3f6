"""Which headers go upstream with a call, and which come back to the client."""

from __future__ import annotations

from typing import Iterable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.config import ProviderConfig
from proxy.core.attribution import PROXY_HEADERS, TAG_PREFIX
from proxy.core.redaction import REPLACEMENT
from proxy.providers import ADAPTERS, Adapter

# Hop-by-hop headers (RFC 9110 §7.6.1) and those the proxy recomputes.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
        # aiohttp has already decoded a compressed request body: it goes upstream plain.
        "content-encoding",
    }
)
# With a configured provider key, a client credential in any family's key header stays
# here (a proxy key sent in the "wrong" header must not reach the provider either).
_ANY_KEY_HEADER = frozenset(h for a in ADAPTERS.values() for h in a.key_headers)
# aiohttp's client decompresses replies, so the encoding headers no longer apply.
_RESPONSE_DROP = frozenset({"content-encoding", "content-length", "transfer-encoding", "connection", "keep-alive"})
# What never goes upstream, by lower-case name: hop-by-hop headers and those the proxy
# reads for itself (core.attribution.is_proxy_header: these and any x-tag-*); with a
# configured provider key, also every family's key header. One set test per header.
_DROP = _HOP | PROXY_HEADERS
_DROP_WITH_KEY = _DROP | _ANY_KEY_HEADER


def forward_headers(request: web.Request, provider: ProviderConfig, adapter: Adapter, proxy_key: str | None = None) -> CIMultiDict[str]:
    """``proxy_key``: the proxy key the client presented (with auth:). It never goes
    upstream, whatever header carries it (Azure's ``api-key``, a cookie)."""
    drop = _DROP_WITH_KEY if provider.api_key else _DROP
    headers: CIMultiDict[str] = CIMultiDict()
    add = headers.add
    for name, value in request.headers.items():
        low = name.lower()
        if low in drop or low.startswith(TAG_PREFIX) or (proxy_key and proxy_key in value):
            continue
        add(name, value)
    if provider.api_key:
        name, value = adapter.auth_header(provider.api_key)
        headers[name] = value
    return headers


def response_headers(resp: aiohttp.ClientResponse, secret: str | None) -> CIMultiDict[str]:
    kept = [(n, v) for n, v in resp.headers.items() if n.lower() not in _RESPONSE_DROP]
    return redact_headers(kept, secret) if secret else CIMultiDict(kept)


def redact_headers(headers: Iterable[tuple[str, str]], secret: str | None) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers:
        if secret and secret in value:
            value = value.replace(secret, REPLACEMENT.decode())
        out.add(name, value)
    return out
