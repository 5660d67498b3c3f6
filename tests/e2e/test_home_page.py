"""``GET /``: a small HTML page of links, not a 404; no secret on it; served without a
proxy key also with auth on (it holds no data)."""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urljoin

import aiohttp
from openai import AsyncOpenAI

from tests.support.config import ALL_KEYS, CLIENT_OPENAI_KEY, OPENAI_MODELS, PROXY_OPENAI_KEY, make_config
from tests.support.provider_replies import openai_chat


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.code: list[str] = []
        self.text: list[str] = []
        self._in_code = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.links += [v for k, v in attrs if k == "href" and v]
        self._in_code = tag == "code"

    def handle_endtag(self, tag: str) -> None:
        self._in_code = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_code:
            self.code.append(data)


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    return page


async def test_the_home_page_links_health_and_each_providers_sdk_url(mock, start_proxy) -> None:
    mock.on("/v1/chat/completions", openai_chat(mock))
    cfg = make_config(mock.url, local={"type": "openai", "base_url": mock.url + "/v1", "models": OPENAI_MODELS})
    proxy = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/") as r:
            assert r.status == 200 and r.content_type == "text/html" and r.charset == "utf-8"
            html = await r.text()
        async with s.head(proxy.url + "/") as r:
            assert r.status == 200 and r.content_type == "text/html"
        page = parse(html)
        assert "/health" in page.links
        for link in page.links:
            async with s.get(urljoin(proxy.url + "/", link)) as r:
                assert r.status == 200, link
                if link == "/health":
                    assert (await r.json())["status"] == "healthy"
    text = " ".join(page.text)
    assert "llm-cost-proxy" in text and "README.md" in text and "docs/" in text
    assert "does not serve" in text
    assert {"/dashboard", "/api/openapi.json"} <= set(page.links)  # each answered 200 above
    urls = set(page.code)
    for name, spec in cfg["providers"].items():
        # The OpenAI SDKs want the /v1 in their base URL, unless the upstream's has it.
        v1 = spec.get("type", name) == "openai" and not spec["base_url"].endswith("/v1")
        assert f"{proxy.url}/{name}{'/v1' if v1 else ''}" in urls, (name, urls)
    assert len([u for u in urls if u.startswith("http")]) == len(cfg["providers"])
    # No secret and no upstream address on it.
    assert not any(k in html for k in ALL_KEYS) and mock.url not in html
    # The URL the page gives, used as it is by the SDK, answers.
    async with AsyncOpenAI(base_url=f"{proxy.url}/local", api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
        reply = await c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hello!"
    [rec] = await proxy.records()  # the page and /health are not calls
    assert rec["provider"] == "local" and mock.requests[0].path == "/v1/chat/completions"


async def test_the_home_page_needs_no_proxy_key_with_auth_on(mock, start_proxy, tmp_path) -> None:
    keys = tmp_path / "keys.yml"
    keys.write_text("keys: []\n")
    cfg = {"providers": {"openai": {"base_url": mock.url, "api_key": PROXY_OPENAI_KEY}}, "auth": {"keys_file": str(keys)}}
    proxy = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/") as r:
            assert r.status == 200
            html = await r.text()
        async with s.get(proxy.url + "/openai/v1/models") as r:
            assert r.status == 401  # calls still need a key
    assert PROXY_OPENAI_KEY not in html and str(keys) not in html
    assert "proxy key" in html


async def test_a_forged_host_header_is_escaped(start_proxy, mock) -> None:
    proxy = await start_proxy(make_config(mock.url))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/", headers={"Host": "evil<script>x</script>"}) as r:
            html = await r.text()
    assert "<script>" not in html and "evil&lt;script&gt;" in html
