"""Proxy keys: created by the CLI and stored hashed; 401/403 in each family's format (as the
official SDKs raise them); revocation and budget changes picked up by a running proxy;
the provider key never leaves the proxy and the proxy key never reaches the provider."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import yaml

from proxy.config import load_config, parse_config
from proxy.errors import ConfigError
from tests.support import ROOT
from tests.support.config import ANTHROPIC_MODELS, GEMINI_MODELS, OPENAI_MODELS, PROXY_ANTHROPIC_KEY, PROXY_GEMINI_KEY, PROXY_OPENAI_KEY
from tests.support.mock_upstream import json_reply
from tests.support.provider_replies import anthropic_message, gemini_response, openai_chat

MSG = [{"role": "user", "content": "hi"}]
GEMINI_PATH = "/v1beta/models/{model}:generateContent"


class Keys:
    """A config.yml with `auth:` in a temp dir, and the real `python -m proxy keys` CLI."""

    def __init__(self, tmp: Path, upstream: str, budgets: dict | None = None) -> None:
        self.tmp, self.config_path, self.log = tmp, tmp / "config.yml", tmp / "cost.jsonl"
        cfg: dict[str, Any] = {
            "providers": {
                "openai": {"base_url": upstream, "api_key": PROXY_OPENAI_KEY, "models": OPENAI_MODELS},
                "anthropic": {"base_url": upstream, "api_key": PROXY_ANTHROPIC_KEY, "models": ANTHROPIC_MODELS},
                "gemini": {"base_url": upstream, "api_key": PROXY_GEMINI_KEY, "models": GEMINI_MODELS},
            },
            "catalog": {"enabled": False},
            "auth": {"keys_file": "keys.yml"},  # relative to config.yml
        }
        if budgets:
            cfg["budgets"] = budgets
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.outputs: list[str] = []

    def cli(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "COST_TRACKING_FILE": str(self.log)}
        p = subprocess.run(
            [sys.executable, "-m", "proxy", "keys", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        self.outputs += [p.stdout, p.stderr]
        if ok:
            assert p.returncode == 0, p.stderr
        return p

    def create(self, *args: str) -> tuple[str, str]:
        """(key, key id)"""
        out = self.cli("create", *args).stdout
        [key] = [line.strip() for line in out.splitlines() if line.strip().startswith("lcp-")]
        return key, hashlib.sha256(key.encode()).hexdigest()[:12]

    def config(self):
        return load_config(self.config_path)


def oai(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key=key, max_retries=0)


def anth(url: str, key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=f"{url}/anthropic", api_key=key, max_retries=0)


def routes(mock) -> None:
    mock.on("/v1/chat/completions", openai_chat(mock))
    mock.on("/v1/messages", json_reply(anthropic_message()))
    for model in ("gemini-2.5-flash", "gemini-2.5-pro"):
        mock.on(
            GEMINI_PATH.format(model=model),
            json_reply(gemini_response(usage={"promptTokenCount": 5, "candidatesTokenCount": 2, "totalTokenCount": 7})),
        )


def seen_by_upstream(mock) -> str:
    """Every path, query, header and body byte the provider received, as one text."""
    return "\n".join(f"{r.path} {dict(r.query)} {dict(r.headers)} {r.body.decode(errors='replace')}" for r in mock.requests)


# --- the keys CLI ---------------------------------------------------------------------------


async def test_keys_are_stored_hashed_and_shown_once(tmp_path, mock):
    keys = Keys(tmp_path, mock.url)
    key, kid = keys.create("--user", "alice", "--team", "research", "--budget-monthly", "50", "--models", "gpt-4o-mini,claude-haiku-4-5")
    assert key.startswith("lcp-") and len(key) == 4 + 43  # token_urlsafe(32): 256 random bits
    kf = tmp_path / "keys.yml"
    text = kf.read_text()
    assert key not in text and key[4:] not in text
    assert hashlib.sha256(key.encode()).hexdigest() in text
    assert stat.S_IMODE(kf.stat().st_mode) == 0o600
    [entry] = yaml.safe_load(text)["keys"]
    assert entry["id"] == kid and entry["user"] == "alice" and entry["team"] == "research"
    assert entry["models"] == ["gpt-4o-mini", "claude-haiku-4-5"] and entry["budget_monthly"] == "50"
    other, _ = keys.create("--user", "bob")
    assert other != key
    listing = keys.cli("list").stdout
    head, *rows = listing.splitlines()
    assert head.split()[:4] == ["KEY", "ID", "USER", "TEAM"]
    assert rows[0].split()[:6] == [kid, "alice", "research", "gpt-4o-mini,claude-haiku-4-5", "$50.00", "$0.00"]
    assert "bob" in rows[1] and "active" in rows[1]
    # Each key was printed once, on the stdout of its `create`; nowhere else (never on stderr).
    assert [i for i, out in enumerate(keys.outputs) if key in out] == [0]
    assert [i for i, out in enumerate(keys.outputs) if other in out] == [2]
    # Bad input is refused with a reason, and the file is left as it was.
    before = kf.read_text()
    bad = keys.cli("create", "--user", "=cmd|calc", ok=False)
    assert bad.returncode == 2 and "--user" in bad.stderr
    assert keys.cli("revoke", "000000000000", ok=False).stderr.strip() == "error: no key with id 000000000000"
    assert kf.read_text() == before


# --- auth through the running proxy -------------------------------------------------------------


async def test_proxy_key_in_provider_key_out(tmp_path, mock, start_proxy, caplog):
    routes(mock)
    mock.on(
        "/v1/embeddings",
        json_reply(lambda rec: {"error": {"message": f"Incorrect API key provided: {rec.headers['Authorization'][7:]}"}}, status=401),
    )
    keys = Keys(tmp_path, mock.url)
    key, kid = keys.create("--user", "alice", "--team", "research")
    proxy = await start_proxy(keys.config(), keys.log)
    async with oai(proxy.url, key) as c:
        r = await c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG, extra_headers={"x-user-id": "mallory"})
        assert r.http_response.status_code == 200
        # An upstream error that echoes the provider's key: the client never sees it.
        with pytest.raises(openai.AuthenticationError) as e:
            await c.embeddings.create(model="text-embedding-3-small", input="x")
        assert PROXY_OPENAI_KEY not in json.dumps(e.value.body) and "[redacted]" in e.value.message
    async with anth(proxy.url, key) as a:
        # (also the proxy key in another family's key header: it stays in the proxy)
        await a.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=MSG, extra_headers={"x-goog-api-key": key})
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{proxy.url}/gemini{GEMINI_PATH.format(model='gemini-2.5-flash')}?key={key}&alt=json",
            json={"contents": [{"parts": [{"text": "hi"}]}]},
        ) as r:
            assert r.status == 200, await r.text()
    # Upstream got the configured provider keys, in each family's header, and never the proxy key.
    auth = [(r.headers.get("Authorization"), r.headers.get("x-api-key"), r.headers.get("x-goog-api-key")) for r in mock.requests]
    assert auth == [
        (f"Bearer {PROXY_OPENAI_KEY}", None, None),
        (f"Bearer {PROXY_OPENAI_KEY}", None, None),
        (None, PROXY_ANTHROPIC_KEY, None),
        (None, None, PROXY_GEMINI_KEY),
    ]
    assert dict(mock.requests[3].query) == {"alt": "json"}  # Gemini's ?key= was taken out
    assert key not in seen_by_upstream(mock) and key[4:] not in seen_by_upstream(mock)
    raw = await proxy.wait_raw_log(4)  # every record, the last one's line included
    records = await proxy.records()
    assert raw == proxy.raw_log()  # nothing came after: all that was checked is all there is
    assert [(r["user_id"], r["team"], r["key_id"]) for r in records] == [("alice", "research", kid)] * 4  # the owner, not x-user-id
    assert records[1]["status"] == 401 and "[redacted]" in records[1]["error"]
    for secret in (key, PROXY_OPENAI_KEY, PROXY_ANTHROPIC_KEY, PROXY_GEMINI_KEY):
        assert secret not in raw and secret not in caplog.text


@pytest.mark.parametrize("case", ["missing", "unknown", "revoked"])
async def test_bad_keys_are_401_in_each_family_with_one_message(case, tmp_path, mock, start_proxy):
    routes(mock)
    keys = Keys(tmp_path, mock.url)
    key, kid = keys.create("--user", "alice")
    if case == "revoked":
        keys.cli("revoke", kid)
    elif case == "unknown":
        key = "lcp-" + "A" * 43
    proxy = await start_proxy(keys.config(), keys.log)
    messages = []
    if case == "missing":
        async with aiohttp.ClientSession() as s:
            for path, body in (
                ("/openai/v1/chat/completions", {"model": "gpt-4o", "messages": MSG}),
                ("/anthropic/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": MSG}),
            ):
                async with s.post(proxy.url + path, json=body) as r:
                    assert r.status == 401
                    messages.append((await r.json())["error"]["message"])
    else:
        async with oai(proxy.url, key) as c:
            with pytest.raises(openai.AuthenticationError) as e:
                await c.chat.completions.create(model="gpt-4o", messages=MSG)
            assert e.value.body["type"] == "authentication_error"
            messages.append(e.value.body["message"])
        async with anth(proxy.url, key) as a:
            with pytest.raises(anthropic.AuthenticationError) as e2:
                await a.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=MSG)
            assert e2.value.body["error"]["type"] == "authentication_error"
            messages.append(e2.value.body["error"]["message"])
    async with aiohttp.ClientSession() as s:
        headers = {} if case == "missing" else {"x-goog-api-key": key}
        async with s.post(f"{proxy.url}/gemini{GEMINI_PATH.format(model='gemini-2.5-flash')}", json={}, headers=headers) as r:
            body = await r.json()
            assert r.status == 401 and body["error"]["code"] == 401 and body["error"]["status"] == "UNAUTHENTICATED"
            messages.append(body["error"]["message"])
    # One message whatever was wrong: no oracle for key guessing. The record says which.
    assert len(set(messages)) == 1 and messages[0].startswith("Invalid or missing proxy key")
    assert mock.requests == []
    records = await proxy.records()
    why = {"missing": "auth: no proxy key", "unknown": "auth: unknown proxy key", "revoked": "auth: revoked proxy key"}[case]
    assert [(r["status"], r["error"]) for r in records] == [(401, why)] * 3


async def test_revoking_and_updating_a_key_reach_a_running_proxy(tmp_path, mock, start_proxy):
    routes(mock)
    keys = Keys(tmp_path, mock.url)
    key, kid = keys.create("--user", "carol", "--budget-monthly", "0.03")
    admin, _ = keys.create("--user", "ops", "--admin")
    proxy = await start_proxy(keys.config(), keys.log)
    async with oai(proxy.url, key) as c:
        # Without max_tokens a gpt-4o call may cost ~$0.041 (a few input tokens at $2.50/M
        # and the default cap of 4096 output tokens at $10/M): more than the key's $0.03,
        # so its monthly budget refuses it ... (the mock bills each call $0.02)
        with pytest.raises(openai.RateLimitError, match=r"key:[0-9a-f]{12} monthly has a limit of \$0.03"):
            await c.chat.completions.create(model="gpt-4o", messages=MSG)
        await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=100)  # ... this one fits
        keys.cli("update", kid, "--budget-monthly", "none")
        await c.chat.completions.create(model="gpt-4o", messages=MSG)  # no budget now
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{proxy.url}/health", headers={"Authorization": f"Bearer {admin}"}) as r:
                assert "detail" in (await r.json())["budgets"]
            async with s.get(f"{proxy.url}/health", headers={"Authorization": f"Bearer {key}"}) as r:
                assert "detail" not in (await r.json())["budgets"]  # a user key sees counts only
        keys.cli("revoke", kid)
        with pytest.raises(openai.AuthenticationError):
            await c.chat.completions.create(model="gpt-4o", messages=MSG)
    records = await proxy.records()
    assert [r["status"] for r in records] == [429, 200, 200, 401]
    listing = keys.cli("list").stdout
    row = next(line for line in listing.splitlines() if line.startswith(kid))
    assert row.split()[1:6] == ["carol", "-", "all", "-", "$0.04"] and "revoked" in row


async def test_model_allowlist_is_403_in_each_family(tmp_path, mock, start_proxy):
    routes(mock)
    keys = Keys(tmp_path, mock.url)
    key, _ = keys.create("--user", "dana", "--models", "gpt-4o,claude-haiku-4-5,gemini-2.5-flash")
    proxy = await start_proxy(keys.config(), keys.log)
    async with oai(proxy.url, key) as c:
        await c.chat.completions.create(model="gpt-4o-2024-08-06", messages=MSG)  # a dated snapshot of an allowed model
        with pytest.raises(openai.PermissionDeniedError) as e:
            await c.chat.completions.create(model="gpt-4o-mini", messages=MSG)  # never a prefix match
        assert e.value.body["type"] == "permission_error" and "'gpt-4o-mini' is not allowed" in e.value.message
        with pytest.raises(openai.PermissionDeniedError):
            await c.files.create(file=("a.jsonl", b"{}"), purpose="batch")  # not a metered model call
    async with anth(proxy.url, key) as a:
        await a.messages.create(model="claude-haiku-4-5-20251001", max_tokens=5, messages=MSG)
        with pytest.raises(anthropic.PermissionDeniedError) as e2:
            await a.messages.create(model="claude-opus-4-1", max_tokens=5, messages=MSG)
        assert e2.value.body["error"]["type"] == "permission_error"
    async with aiohttp.ClientSession() as s:
        for model, status in (("gemini-2.5-flash", 200), ("gemini-2.5-pro", 403)):
            async with s.post(
                f"{proxy.url}/gemini{GEMINI_PATH.format(model=model)}", json={"contents": []}, headers={"x-goog-api-key": key}
            ) as r:
                assert r.status == status
                if status == 403:
                    assert (await r.json())["error"]["status"] == "PERMISSION_DENIED"
    assert [r.json.get("model") or r.path for r in mock.requests] == [
        "gpt-4o-2024-08-06",
        "claude-haiku-4-5-20251001",
        GEMINI_PATH.format(model="gemini-2.5-flash"),
    ]
    records = await proxy.records()
    assert [r["status"] for r in records] == [200, 403, 403, 200, 403, 200, 403]


# --- configuration errors stop start-up, naming file, key and reason ---------------------------


def _cfg(tmp_path: Path, auth: Any, api_key: bool = True) -> dict:
    return {"providers": {"openai": {"base_url": "http://127.0.0.1:1", **({"api_key": "sk-x"} if api_key else {})}}, "auth": auth}


@pytest.mark.parametrize(
    "auth,api_key,key",
    [
        ({"keys_file": "keys.yml"}, False, "providers.openai.api_key"),
        ({"admin_keys": ["lcp-abc"]}, True, "auth.admin_keys[0]"),
        ({"admin_keys": "sha256:00"}, True, "auth.admin_keys"),
        ({"keys_fil": "x"}, True, "auth.keys_fil"),
        ("yes", True, "auth"),
    ],
)
def test_bad_auth_config(tmp_path, auth, api_key, key):
    with pytest.raises(ConfigError) as e:
        parse_config(_cfg(tmp_path, auth, api_key), str(tmp_path / "config.yml"))
    assert e.value.key == key and e.value.path == str(tmp_path / "config.yml")
    if key == "auth.admin_keys[0]":
        assert "lcp-abc" not in str(e.value)  # a pasted key is not echoed back


def test_a_broken_keys_file_stops_start_up(tmp_path):
    # config.yml itself parses (the keys file is storage's, read when the proxy starts);
    # starting the proxy on it stops with the file, the entry and the reason.
    from proxy.web.app import create_app

    kf = tmp_path / "keys.yml"
    kf.write_text(yaml.safe_dump({"keys": [{"id": "abc", "sha256": "0" * 64}]}))
    config = parse_config(_cfg(tmp_path, {"keys_file": "keys.yml"}), str(tmp_path / "config.yml"))
    with pytest.raises(ConfigError) as e:
        create_app(config, tmp_path / "cost.jsonl")
    assert (e.value.path, e.value.key) == (str(kf), "keys[0].id")
    kf.write_text("keys: [unclosed")
    config = parse_config(_cfg(tmp_path, {"keys_file": str(kf)}), str(tmp_path / "config.yml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        create_app(config, tmp_path / "cost.jsonl")
    (tmp_path / "config.yml").write_text(yaml.safe_dump(_cfg(tmp_path, {"keys_file": str(kf)})))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "--config",
            str(tmp_path / "config.yml"),
            "--port",
            "1",
            "--log-file",
            str(tmp_path / "logs" / "cost.jsonl"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 2 and str(kf) in res.stderr and "not valid YAML" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "logs").exists()  # stopped before the log (or its directory) was created


def test_key_store_admins_and_reloading(tmp_path, caplog):
    from proxy.keys import KeyEntry, key_hash, new_key
    from proxy.storage.keyfile import KeyStore, save_keys

    cfg_admin, file_admin, user = new_key(), new_key(), new_key()
    kf = tmp_path / "keys.yml"
    entries = [
        KeyEntry(key_hash(file_admin)[:12], key_hash(file_admin), "ops", admin=True),
        KeyEntry(key_hash(user)[:12], key_hash(user), "u"),
    ]
    save_keys(kf, entries)
    store = KeyStore(kf, frozenset({key_hash(cfg_admin)}))
    assert store.is_admin(cfg_admin) and store.is_admin(file_admin)
    assert not store.is_admin(user) and not store.is_admin("") and not store.is_admin(None)
    assert store.lookup(cfg_admin) is None  # a config admin key is for admin surfaces, not for calls
    assert store.lookup(user).user == "u"
    save_keys(kf, [dataclasses.replace(entries[0], revoked="2026-01-01T00:00:00Z"), entries[1]])
    store.refresh()
    assert not store.is_admin(file_admin)  # a revoked admin key is no admin
    kf.write_text("keys: [{sha256: nothex}]")  # a bad hand edit while running ...
    store.refresh()
    assert store.lookup(user) is not None  # ... keeps the previous keys in force
    assert "keys file not reloaded" in caplog.text


def test_keys_cli_needs_an_auth_section(tmp_path, capsys):
    from proxy.cli.keys import keys_main

    cfg = tmp_path / "config.yml"
    cfg.write_text("providers: {openai: {base_url: 'http://x'}}\n")
    assert keys_main(["--config", str(cfg), "list"]) == 2
    assert "has no auth: section" in capsys.readouterr().err
    assert keys_main(["--keys-file", str(tmp_path / "k.yml"), "--config", str(cfg), "create", "--team", "infra"]) == 0
    out = capsys.readouterr().out
    assert "for (team infra)" in out and (tmp_path / "k.yml").exists()
