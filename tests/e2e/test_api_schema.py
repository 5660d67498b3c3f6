"""The analytics API against its own OpenAPI document (/api/openapi.json), fuzzed by
schemathesis: the real proxy run as a process over a few thousand synthetic records,
every operation sent schema-valid and invalid requests (examples, coverage and fuzzing
phases), every answer checked against the document; the document itself checked against
OpenAPI 3.1 and against the routes the app registers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import orjson
import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

from proxy.config import parse_config
from proxy.reports.api_query import ENDPOINTS
from proxy.web.api import handle_api_not_found
from proxy.web.app import create_app
from proxy.web.openapi import openapi_document
from tests.support import ROOT
from tests.support.config import make_config
from tests.support.ports import HOST, free_port
from tests.support.proxy_process import proxy_command, wait_serving
from tests.support.synthlog import REALISTIC, records, write_log

SEED = 20261201
MAX_EXAMPLES = 25  # per operation, fuzzing phase; examples and coverage add their own
# The log: 3000 calls over the 40 days before now, so every window has data.
RECORDS = list(records(3000, mix=REALISTIC, seed=SEED, end=time.time(), days=40))
# Names the log holds, for path parameters that find something (besides the fuzzed ones).
KNOWN = {
    "provider": sorted({r["provider"] for r in RECORDS}),
    "user": sorted({r["user_id"] for r in RECORDS})[:20],
}
# Served by the app under /api/ but not in the document (checked, not assumed).
UNDOCUMENTED = {("GET", "/api/openapi.json"), ("GET", "/api/events")}


# --------------------------------------------------------------------------- the proxy


class Served:
    def __init__(self, url: str, log: Path) -> None:
        self.url, self.log = url, log


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


async def _wait(url: str, proc: subprocess.Popen[bytes]) -> bool:
    async with aiohttp.ClientSession() as s:
        return await wait_serving(s, url, exited=lambda: proc.poll() is not None, timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``python -m proxy`` on 127.0.0.1 over the synthetic log, with budgets; nothing
    listens upstream (the API answers from the log, no call is proxied)."""
    tmp = tmp_path_factory.mktemp("api-schema")
    log = write_log(tmp / "cost.jsonl", RECORDS)
    cfg = make_config(f"http://{HOST}:{free_port()}")
    cfg["budgets"] = {
        "limits": [
            {"scope": "global", "period": "monthly", "usd": 500},
            {"scope": "user", "period": "daily", "usd": 0.5},
            {"scope": "user", "match": KNOWN["user"][0], "period": "weekly", "usd": 2},
            {"scope": "tag", "tag": "team", "match": "research", "period": "monthly", "usd": 50},
        ]
    }
    path = tmp / "config.yml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    port = free_port()
    stderr = tmp / "stderr.txt"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            proxy_command(path, port, host=HOST, log_file=log), cwd=tmp, env=_env(), stdout=subprocess.DEVNULL, stderr=err
        )
    url = f"http://{HOST}:{port}"
    try:
        if not asyncio.run(_wait(f"{url}/health", proc)):
            raise AssertionError(f"proxy did not start: {stderr.read_text()}")
        yield Served(url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- the fuzzing

CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "generation": {"mode": "all", "deterministic": True, "database": "none", "max-examples": MAX_EXAMPLES},
        # A request the document calls invalid is a 400 (the bad parameter named).
        "checks": {"negative_data_rejection": {"expected-statuses": ["400"]}},
    }
)
# The document the app serves, byte for byte (test_served_document_is_the_fuzzed_one):
# loaded at import, as schema.parametrize() needs its operations at collection.
schema = schemathesis.openapi.from_dict(orjson.loads(openapi_document()), config=CONFIG)


@schema.hook
def before_generate_path_parameters(context: Any, strategy: Any) -> Any:
    """About half the path names drawn are ones the log holds, so those answers have numbers."""
    path = context.operation.path if context.operation is not None else ""
    for name, names in KNOWN.items():
        if f"{{{name}}}" in path:
            return st.one_of(st.fixed_dictionaries({name: st.sampled_from(names)}), strategy)
    return strategy


def error_body(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx answer is the contract's error body: JSON with error.message and error.type."""
    if not 400 <= response.status_code < 500:
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.headers
    body = response.json()
    err = body.get("error") if isinstance(body, dict) else None
    assert isinstance(err, dict), f"no error object: {response.text[:300]}"
    assert isinstance(err.get("message"), str) and err["message"].strip(), f"no message: {response.text[:300]}"
    assert isinstance(err.get("type"), str) and err["type"], f"no type: {response.text[:300]}"
    if response.status_code == 400:
        assert err["type"] == "invalid_request_error", response.text[:300]
        if case.operation.path.startswith("/api/analytics/"):  # the bad parameter, named
            sent = {*(case.query or {}), *(case.path_parameters or {})}
            assert err.get("param") in sent, f"param {err.get('param')!r} is none of {sorted(sent)}: {response.text[:300]}"
    return True


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    error_body,
]


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_document(case: Any, served: Served) -> None:
    case.call_and_validate(base_url=served.url, checks=CHECKS)


# --------------------------------------------------------------------------- the document


async def test_served_document_is_the_fuzzed_one(served: Served) -> None:
    """/api/openapi.json is the document fuzzed above, and schemathesis loads it from the
    URL as valid OpenAPI 3.1 with every operation well formed."""
    async with aiohttp.ClientSession() as s, s.get(f"{served.url}/api/openapi.json") as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        assert await r.read() == openapi_document()
    loaded = await asyncio.to_thread(schemathesis.openapi.from_url, f"{served.url}/api/openapi.json")
    loaded.validate()  # the OpenAPI 3.1 meta-schema
    assert loaded.specification.version == "3.1.0"
    ops = list(loaded.get_all_operations())
    assert [r.err() for r in ops if not isinstance(r, Ok)] == []
    labels = {r.ok().label for r in ops if isinstance(r, Ok)}
    doc = orjson.loads(openapi_document())
    assert labels == {f"{m.upper()} {p}" for p, item in doc["paths"].items() for m in item}


def _api_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, pattern) of every route the app registers under /api/, but the catch-all."""
    out = set()
    for route in app.router.routes():
        pattern = route.resource.canonical if route.resource is not None else ""
        if pattern.startswith("/api/") and route.handler is not handle_api_not_found:
            out.add((route.method, pattern))
    return out


async def test_document_lists_every_api_route(tmp_path: Path) -> None:
    """Walk the router of the app create_app builds: every /api/ route is reached by a
    path of the document (or is one of UNDOCUMENTED), every analytics kind the handler
    knows has its path, and every documented path reaches a real handler."""
    cfg = make_config(f"http://{HOST}:{free_port()}")
    cfg["features"] = {"cost_tracking": {"enabled": False}}  # no log writer to close
    app = create_app(parse_config(cfg, str(tmp_path / "config.yml")), tmp_path / "cost.jsonl", host=HOST, console=False)
    routes = _api_routes(app)
    doc = orjson.loads(openapi_document())
    reached: set[tuple[str, str]] = set()
    kinds: set[str] = set()
    for path, item in doc["paths"].items():
        for method in item:
            concrete = path.replace("{provider}", "openai").replace("{user}", "alice").replace("{record_id}", "0a1b2c")
            match = await app.router.resolve(make_mocked_request(method.upper(), concrete, app=app))
            route = match.route
            assert route.handler is not handle_api_not_found, f"{method.upper()} {path}: no handler"
            assert route.resource is not None
            reached.add((route.method, route.resource.canonical))
            if "kind" in match:
                kinds.add({"users": "user"}.get(match["kind"], match["kind"]) if "name" in match else match["kind"])
            elif path == "/api/analytics/export":
                kinds.add("export")
    assert routes - reached == UNDOCUMENTED
    assert reached <= routes
    assert kinds == set(ENDPOINTS)
    # And the two left out really are served (not the catch-all's 404).
    for method, path in UNDOCUMENTED:
        match = await app.router.resolve(make_mocked_request(method, path, app=app))
        assert match.route.handler is not handle_api_not_found
        assert path not in doc["paths"]


UNDECLARED = ("GET", "POST", "PUT", "PATCH", "DELETE", "TRACE")


async def test_undeclared_method_is_405(served: Served) -> None:
    """A method the document does not list for a path: 405 with Allow, the JSON error body."""
    doc = orjson.loads(openapi_document())
    wrong = []
    async with aiohttp.ClientSession() as s:
        for path, item in doc["paths"].items():
            concrete = path.replace("{provider}", KNOWN["provider"][0]).replace("{user}", KNOWN["user"][0]).replace("{record_id}", "0a1b2c")
            allowed = {m.upper() for m in item}
            for method in sorted(set(UNDECLARED) - allowed):
                async with s.request(method, f"{served.url}{concrete}") as r:
                    body = orjson.loads(await r.read())
                    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
                    allow = {m.strip() for m in r.headers.get("Allow", "").split(",") if m.strip()}
                    if r.status != 405 or not allowed <= allow:
                        wrong.append((method, path, r.status, r.headers.get("Allow")))
    assert wrong == []


async def test_usage_body_must_be_json_by_content_type(served: Served) -> None:
    """POST /api/usage takes application/json only: a JSON body sent as text is a 415."""
    body = b'{"model": "gpt-4o", "input_tokens": 10, "output_tokens": 5}'
    async with aiohttp.ClientSession() as s:
        for ctype in ("text/plain", "multipart/form-data"):
            async with s.post(f"{served.url}/api/usage", data=body, headers={"Content-Type": ctype}) as r:
                assert r.status == 415, ctype
                assert "application/json" in orjson.loads(await r.read())["error"]["message"]
