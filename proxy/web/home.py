"""``GET /``: a small page of links (name, version, /health, each provider's base URL
for an SDK, where the documentation is). It holds no data and no secret, so it is
served without a proxy key, also with ``auth:`` on."""

from __future__ import annotations

from html import escape

from aiohttp import web

from proxy.config import Config, client_base_path
from proxy.defaults import version
from proxy.web.state import APP_STATE

NAME = "llm-cost-proxy"


def home_page(config: Config, origin: str, version: str) -> str:
    """The page for a client that reached the proxy at ``origin`` (scheme://host:port).
    Provider rows name the provider, its API family and the proxy URL to use; never the
    upstream URL or its key."""
    e = escape
    rows = "\n".join(
        f"<tr><td>{e(name)}</td><td>{e(p.type)}</td><td><code>{e(origin + client_base_path(p))}</code></td></tr>"
        for name, p in config.providers.items()
    )
    tracking = (
        "Cost tracking is on: every call is priced and appended to the cost log."
        if config.cost_tracking
        else "Cost tracking is off: calls are forwarded and no log is written."
    )
    auth = "<p>Clients present a proxy key (auth is on); this page and /health need none.</p>" if config.auth is not None else ""
    title = f"{NAME} {e(version)}"
    return f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{title}</title></head>
<body>
<h1>{title}</h1>
<p>An OpenAI-compatible proxy that meters and prices every LLM call. {tracking}</p>
{auth}
<h2>Links</h2>
<ul>
<li><a href="/health">/health</a>: the last 24 hours' totals, as JSON</li>
<li><a href="/dashboard">/dashboard</a>: costs, usage, users and budgets in the browser</li>
<li><a href="/api/openapi.json">/api/openapi.json</a>: the analytics API behind it (docs/api.md)</li>
</ul>
<h2>Providers</h2>
<p>Give your SDK the base URL of its provider:</p>
<table>
<tr><th>provider</th><th>API family</th><th>base URL</th></tr>
{rows}
</table>
<h2>Documentation</h2>
<p>The proxy does not serve its documentation. Read <code>README.md</code> and the
<code>docs/</code> directory of the llm-cost-proxy repository (configuration, reports,
budgets, operations); <code>python -m proxy --help</code> lists the commands.</p>
</body>
</html>
"""


async def handle_home(request: web.Request) -> web.Response:
    state = request.app[APP_STATE]
    # The address the client used, so the URLs work from where it is (escaped: the Host
    # header is the client's).
    origin = f"{request.scheme}://{request.host}"
    return web.Response(text=home_page(state.config, origin, version()), content_type="text/html")
