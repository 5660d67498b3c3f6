"""``/dashboard``: the page and its three files, shipped inside the package (no CDN, no
build step), and what is served instead when the API is off."""

from __future__ import annotations

import ipaddress
from importlib import resources

from aiohttp import web

from proxy.reports.analytics import error_body

_STATIC = {
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
}
# The page calls only its own origin; nothing it shows may be framed by another site.
_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _asset(name: str) -> bytes:
    return resources.files("proxy.web").joinpath("static", name).read_bytes()


async def handle_dashboard(request: web.Request) -> web.Response:
    return web.Response(body=_asset("dashboard.html"), content_type="text/html", charset="utf-8", headers=_HEADERS)


async def handle_static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    kind = _STATIC.get(name)
    if kind is None:
        raise web.HTTPNotFound()
    return web.Response(body=_asset(name), content_type=kind, charset="utf-8", headers=_HEADERS)


def add_dashboard_routes(app: web.Application) -> None:
    app.router.add_get("/dashboard", handle_dashboard)
    app.router.add_get("/dashboard/", handle_dashboard)
    app.router.add_get("/dashboard/static/{name}", handle_static)


def is_loopback(host: str | None) -> bool:
    """Whether every address ``host`` names is this machine's own (127.0.0.0/8, ::1)."""
    if host is None:
        return True  # an app made in-process, not listening anywhere yet (tests, embedders)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def off_reason(dashboard: bool, auth: bool, public: bool, host: str | None) -> str | None:
    """Why the API and dashboard are off, or None when they are served."""
    if not dashboard:
        return "dashboard.enabled is false in the config"
    if auth or public or is_loopback(host):
        return None
    return (
        f"the proxy listens on {host} without auth: anyone reaching it would see every call's cost and user; "
        "configure auth: (docs/budgets.md#proxy-keys), listen on 127.0.0.1, or set dashboard.public: true"
    )


def add_off_routes(app: web.Application, reason: str) -> None:
    async def off(request: web.Request) -> web.Response:
        body = error_body(f"the analytics API and dashboard are off: {reason}", "not_found_error", None)
        return web.Response(status=404, body=body, content_type="application/json")

    app.router.add_route("*", "/api/{tail:.*}", off)
    app.router.add_route("*", "/dashboard{tail:.*}", off)
