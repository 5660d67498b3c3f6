"""Email alerts (``alerts.email``) against a real SMTP server on 127.0.0.1 (aiosmtpd, with
AUTH): a budget warning and a limit mail with figures computed here from the records the
proxy wrote; the daily summary equal to what ``python -m proxy report --since 24 --format
summary`` prints for the same log and moment; a server that is down, refuses the login or
is slow never slows or fails a call, and a failure is logged once, without the password;
STARTTLS and implicit TLS against a certificate made here."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import ipaddress
import json
import logging
import re
import socket
import ssl
import time
from decimal import ROUND_HALF_UP, Decimal
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from click.testing import CliRunner
from cryptography import x509  # a dependency of google-auth (google-genai)
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.budgets import BudgetState, Limit
from proxy.cli.app import cli
from proxy.core.estimate import estimate_input_tokens
from proxy.core.money import format_usd
from proxy.outputs import EmailConfig
from proxy.web.mailer import MAILER, QUEUE_SIZE, Mailer, Outgoing, budget_message, compose, next_summary_time
from proxy.web.state import APP_STATE
from tests.support.config import CLIENT_ANTHROPIC_KEY, CLIENT_OPENAI_KEY, make_config
from tests.support.inproc import ProxyHandle
from tests.support.mock_upstream import MockUpstream
from tests.support.ports import free_port
from tests.support.provider_replies import anthropic_message, chat_completion
from tests.support.records import gpt4o_call, parse_log

UTC = dt.UTC
USER, PASSWORD, PASSWORD_ENV = "proxy-mailer", "s3cret-smtp-Pa55-7f3a9c", "LCP_TEST_SMTP_PASSWORD"
SENDER, TO = "llm-proxy@example.test", ["ops@example.test", "finance@example.test"]
# $7 per 1M output tokens and free input: a call with max_tokens=1234 costs (and reserves) $0.008638.
FLAT = {"flat-7": {"pricing": {"input": 0, "output": 7}}}
MAX_TOKENS = 1234
FIXED_NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=UTC).timestamp()  # the budgets' clock in most tests
MSG: list[Any] = [{"role": "user", "content": "Say hi"}]


# --- a real SMTP server ---------------------------------------------------------------------


class Inbox:
    """aiosmtpd's handler and authenticator: keeps what arrives; ``refuse`` turns logins
    down; ``delays``: how long to hold each DATA command in turn (a slow server)."""

    def __init__(self, delays: tuple[float, ...] = ()) -> None:
        self.delays = list(delays)
        self.refuse = False
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.logins: list[tuple[bytes, bytes]] = []
        self.data_started: list[float] = []

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and not self.refuse
            and (auth_data.login, auth_data.password) == (USER.encode(), PASSWORD.encode())
        )
        if isinstance(auth_data, LoginPassword):
            self.logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=ok, handled=False)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's name)
        self.data_started.append(time.monotonic())
        if self.delays:
            await asyncio.sleep(self.delays.pop(0))
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        self.messages.append(msg)
        return "250 OK: queued"

    async def wait(self, n: int, timeout: float = 5.0) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < n:
            assert time.monotonic() < deadline, f"{len(self.messages)} of {n} messages arrived in {timeout:g}s"
            await asyncio.sleep(0.02)
        return self.messages


async def smtp_server(inbox: Inbox, port: int | None = None, **kwargs: Any) -> Controller:
    kwargs.setdefault("auth_require_tls", False)
    c = Controller(inbox, hostname="127.0.0.1", port=port or free_port(), authenticator=inbox.authenticate, **kwargs)
    await asyncio.to_thread(c.start)
    return c


@pytest.fixture
async def servers():
    started: list[Controller] = []

    async def start(inbox: Inbox, port: int | None = None, **kwargs: Any) -> Controller:
        c = await smtp_server(inbox, port, **kwargs)
        started.append(c)
        return c

    yield start
    for c in started:
        await asyncio.to_thread(c.stop)


# --- the proxy --------------------------------------------------------------------------


def echo_usage(request_model: str = "flat-7"):
    """Usage is the most the request allows (the proxy's own input estimate, max_tokens
    out), so a call's cost equals what the budget reserved for it."""

    async def handler(request: web.Request, rec: Any) -> web.StreamResponse:
        body = rec.json
        prompt = estimate_input_tokens(body, body["model"])
        out = body.get("max_tokens") or 16
        usage = {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}
        return web.json_response(chat_completion(request_model, usage))

    return handler


def email_config(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "tls": "none",
        "user": USER,
        "password_env": PASSWORD_ENV,
        "from": SENDER,
        "to": TO,
        "timeout": 3,
        **extra,
    }


def proxy_config(upstream: str, email_cfg: dict[str, Any] | None, budgets: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = make_config(upstream, flat={"type": "openai", "base_url": upstream, "models": FLAT})
    if budgets is not None:
        cfg["budgets"] = budgets
    if email_cfg is not None:
        cfg["alerts"] = {"email": email_cfg}
    return cfg


def client(url: str, user: str = "alice") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/flat/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0, default_headers={"x-user-id": user})


async def timed_call(c: openai.AsyncOpenAI) -> tuple[float, int]:
    """One call's wall time and status (a budget's 429 is a status here, not an error)."""
    t0 = time.monotonic()
    try:
        await c.chat.completions.create(model="flat-7", messages=MSG, max_tokens=MAX_TOKENS)
        status = 200
    except openai.RateLimitError as e:
        status = e.status_code
    return time.monotonic() - t0, status


def mailer_of(proxy: ProxyHandle) -> Mailer:
    return proxy.runner.app[MAILER]


def fields(msg: EmailMessage) -> dict[str, str]:
    """A budget mail's ``Label:   value`` lines."""
    body = msg.get_content().replace("\r\n", "\n")
    return {m[1]: m[2] for m in re.finditer(r"^([A-Z][a-z ]+): {2,}(.+)$", body, re.M)}


def usd(amount: Decimal) -> str:
    return format_usd(amount, exact=True)


def clean_log(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)


# --- budget alerts ----------------------------------------------------------------------


async def test_warning_and_limit_mails_carry_the_budgets_figures(mock: MockUpstream, start_proxy, servers, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="proxy")
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    inbox = Inbox()
    smtp = await servers(inbox)
    mock.on("/v1/chat/completions", echo_usage())
    limit, warn_at = Decimal("0.03"), 0.5
    budgets = {"warn_at": warn_at, "limits": [{"scope": "global", "period": "daily", "usd": float(limit)}]}
    proxy = await start_proxy(proxy_config(mock.url, email_config(smtp.port), budgets), clock=lambda: FIXED_NOW)
    async with client(proxy.url) as c:
        results = [await timed_call(c) for _ in range(5)]
    statuses = [s for _, s in results]
    assert statuses == [200, 200, 200, 429, 429]
    assert max(t for t, _ in results) < 1.0
    messages = await inbox.wait(2)
    await asyncio.sleep(0.3)
    assert len(messages) == 2  # once per budget and period: the second refusal sends nothing

    records = await proxy.wait_records(5)
    costs = [Decimal(str(r["total_cost"])) for r in records if r["status"] == 200]
    assert [r["status"] for r in records] == statuses and all(x is not None and x > 0 for x in costs)
    # The warning: the first call whose reservation brings spent + held to warn_at; the
    # upstream reports the most the call could use, so what it held is what it cost.
    k = next(i for i in range(len(costs)) if sum(costs[: i + 1]) >= limit * Decimal(str(warn_at)))
    w_spent, w_held = sum(costs[:k], Decimal(0)), costs[k]
    l_spent = sum(costs, Decimal(0))  # the refusal: every call before it settled, nothing held
    period = "daily, 2026-11-23T00:00:00Z to 2026-11-24T00:00:00Z"

    warning, limit_mail = messages
    w_pct = int((w_spent + w_held) * 100 / limit)
    assert warning["Subject"] == f"LLM budget warning: global daily at {w_pct}% of {usd(limit)}"
    assert fields(warning) == {
        "Budget": "global daily",
        "Used": f"{w_pct}% ({usd(w_spent + w_held)} of {usd(limit)})",
        "Spent": usd(w_spent),
        "In flight": f"{usd(w_held)} (held for calls in progress)",
        "Limit": usd(limit),
        "Remaining": usd(limit - w_spent - w_held),
        "Period": period,
        "Resets at": "2026-11-24T00:00:00Z",
        "Proxy": socket.gethostname(),
    }
    l_pct = int(l_spent * 100 / limit)
    assert limit_mail["Subject"] == f"LLM budget limit reached: global daily ({usd(l_spent)} of {usd(limit)} used)"
    got = fields(limit_mail)
    assert (got["Used"], got["Spent"], got["Remaining"]) == (
        f"{l_pct}% ({usd(l_spent)} of {usd(limit)})",
        usd(l_spent),
        usd(limit - l_spent),
    )
    assert got["In flight"].startswith("$0.00 ") and got["Period"] == period
    # Figures as the proxy's own log line says them.
    line = f"budget limit reached: global daily at {l_pct}% ({usd(l_spent)} of {usd(limit)} spent or held)"
    assert any(line in r.getMessage() for r in caplog.records)

    for msg in messages:
        assert msg["From"] == SENDER and msg["To"] == ", ".join(TO)
        assert msg["Auto-Submitted"] == "auto-generated" and msg["Message-ID"].endswith("@example.test>")
    assert [m["X-LLM-Cost-Proxy"] for m in messages] == ["warning", "limit"]
    assert inbox.envelopes == [(SENDER, TO)] * 2
    assert inbox.logins and set(inbox.logins) == {(USER.encode(), PASSWORD.encode())}
    assert PASSWORD not in clean_log(caplog) and PASSWORD not in proxy.raw_log()
    assert mailer_of(proxy).sent == 2 and mailer_of(proxy).failed == 0


# --- the daily summary ------------------------------------------------------------------


async def test_daily_summary_is_the_reports_summary_of_the_last_24_hours(mock: MockUpstream, start_proxy, servers, monkeypatch, tmp_path):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    log_path = tmp_path / "cost.jsonl"
    # A call from 30 hours ago: outside the summary's 24 hours.
    log_path.write_bytes(orjson.dumps(gpt4o_call(time.time() - 30 * 3600)) + b"\n")
    mock.on("/v1/chat/completions", echo_usage("gpt-4o-2024-08-06"))
    mock.on("/compat/v1/chat/completions", echo_usage("gpt-4o-mini"))
    usage = {"input_tokens": 1200, "output_tokens": 345, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    mock.on("/v1/messages", lambda request, rec: _json(anthropic_message("claude-haiku-4-5", usage)))
    first = await start_proxy(proxy_config(mock.url, None), log_path=log_path)
    async with openai.AsyncOpenAI(base_url=f"{first.url}/openai/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
        for n in (100, 250):
            await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=n)
    async with openai.AsyncOpenAI(base_url=f"{first.url}/compat/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=77)
    async with anthropic.AsyncAnthropic(base_url=f"{first.url}/anthropic", api_key=CLIENT_ANTHROPIC_KEY, max_retries=0) as a:
        await a.messages.create(model="claude-haiku-4-5", messages=MSG, max_tokens=345)
    await first.stop()
    records = [json.loads(line, parse_float=Decimal) for line in log_path.read_text().splitlines()]
    recent = records[1:]
    parse_log("".join(line + "\n" for line in log_path.read_text().splitlines()[1:]))  # the proxy's own are whole records
    assert len(recent) == 4 and all(r["status"] == 200 for r in recent)

    # A proxy whose clock is a second or two before a whole minute, which is the summary time
    # in a zone half an hour off UTC (so the wall clock read is the zone's, not UTC's).
    zone = ZoneInfo("Asia/Kolkata")
    now = time.time()
    target = (int(now // 60) + 2) * 60
    offset = target - now - 2.5
    hhmm = dt.datetime.fromtimestamp(target, zone).strftime("%H:%M")
    inbox = Inbox()
    smtp = await servers(inbox)
    cfg = email_config(smtp.port, daily_summary=hhmm, timezone="Asia/Kolkata", budget_alerts=False)
    second = await start_proxy(proxy_config(mock.url, cfg), log_path=log_path, clock=lambda: time.time() + offset)
    assert mailer_of(second).alert not in second.runner.app[APP_STATE].alert_sinks  # budget_alerts: false
    (msg,) = await inbox.wait(1, timeout=8)
    assert time.time() + offset >= target
    body = msg.get_content().replace("\r\n", "\n")

    # The command line's report for the same log at the same moment.
    at = dt.datetime.fromtimestamp(target, UTC)
    result = CliRunner().invoke(
        cli,
        ["report", "--since", "24", "--format", "summary", "--log-file", str(log_path)],
        env={"ANALYZE_COSTS_NOW": at.isoformat(), "COST_TRACKING_FILE": None},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    assert body == result.stdout

    total = sum((Decimal(str(r["total_cost"])) for r in recent), Decimal(0))
    six = f"${total.quantize(Decimal('0.000001'), ROUND_HALF_UP)}"
    assert msg["Subject"] == f"Daily LLM Costs: {six}, 4 requests (last 24 hours)"
    assert f"Total Cost: {six}\n" in body and "Total Requests: 4\n" in body
    assert f" to {at.replace(tzinfo=None).isoformat()}\n" in body  # the 24 hours end at the summary time
    assert f"Total Tokens: {sum(r['total_tokens'] for r in recent):,}\n" in body
    assert msg["X-LLM-Cost-Proxy"] == "summary" and msg["To"] == ", ".join(TO)
    await asyncio.sleep(0.2)
    assert len(inbox.messages) == 1  # one summary a day


async def _json(payload: Any) -> web.Response:
    return web.json_response(payload)


# --- failures never reach a call ---------------------------------------------------------


@pytest.mark.parametrize("fault", ["down", "refuses"])
async def test_a_failing_server_never_slows_a_call_and_is_logged_once(
    mock: MockUpstream, start_proxy, servers, monkeypatch, caplog, fault: str
):
    caplog.set_level(logging.INFO, logger="proxy")
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    inbox = Inbox()
    port = free_port()
    if fault == "refuses":
        inbox.refuse = True
        await servers(inbox, port)
    mock.on("/v1/chat/completions", echo_usage())
    # Each user's first call crosses warn_at, its second is refused: two alerts per user.
    budgets = {"warn_at": 0.5, "limits": [{"scope": "user", "period": "daily", "usd": 0.01}]}
    proxy = await start_proxy(proxy_config(mock.url, email_config(port), budgets), clock=lambda: FIXED_NOW)
    mailer = mailer_of(proxy)
    async with client(proxy.url, "alice") as c:
        first = [await timed_call(c) for _ in range(2)]
    assert [s for _, s in first] == [200, 429] and max(t for t, _ in first) < 1.0
    deadline = time.monotonic() + 5
    while mailer.failed < 2:
        assert time.monotonic() < deadline, f"failed sends: {mailer.failed}"
        await asyncio.sleep(0.02)
    failures = [r for r in caplog.records if "email: could not send" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.WARNING
    why = "ConnectionRefusedError" if fault == "down" else "SMTPAuthenticationError"
    assert why in failures[0].getMessage() and "LLM budget warning: user:alice daily" in failures[0].getMessage()

    # The server is back (or takes the login again): the next alert goes out, and the log says
    # how many were lost meanwhile.
    if fault == "down":
        await servers(inbox, port)
    inbox.refuse = False
    async with client(proxy.url, "bob") as c:
        t, status = await timed_call(c)
    assert status == 200 and t < 1.0
    (msg,) = await inbox.wait(1)
    assert msg["Subject"].startswith("LLM budget warning: user:bob daily (each user) at 86%")
    await asyncio.sleep(0.05)
    assert any(
        "email: sending to 127.0.0.1" in r.getMessage() and "2 message(s) could not be sent before" in r.getMessage()
        for r in caplog.records
    )
    assert len([r for r in caplog.records if "email: could not send" in r.getMessage()]) == 1
    assert (mailer.sent, mailer.failed, mailer.dropped) == (1, 2, 0)
    assert PASSWORD not in clean_log(caplog) and PASSWORD not in proxy.raw_log()


async def test_a_slow_server_never_slows_a_call_and_is_waited_for_at_shutdown(mock: MockUpstream, start_proxy, servers, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    inbox = Inbox(delays=(1.5,))
    smtp = await servers(inbox)
    mock.on("/v1/chat/completions", echo_usage())
    budgets = {"warn_at": 0.5, "limits": [{"scope": "user", "period": "daily", "usd": 0.01}]}
    proxy = await start_proxy(proxy_config(mock.url, email_config(smtp.port), budgets), clock=lambda: FIXED_NOW)
    async with client(proxy.url, "alice") as c:
        t, status = await timed_call(c)  # alice's warning: the server now takes 1.5 s over it
    assert status == 200 and t < 1.0
    deadline = time.monotonic() + 3
    while not inbox.data_started:
        assert time.monotonic() < deadline, "the warning was never sent"
        await asyncio.sleep(0.01)
    timings = []
    for user in ("bob", "carol", "dave"):  # each queues one more warning behind the slow one
        async with client(proxy.url, user) as c:
            timings.append(await timed_call(c))
    assert [s for _, s in timings] == [200] * 3 and max(t for t, _ in timings) < 0.5
    assert not inbox.messages  # all of them happened while the first send was still waiting

    t0 = time.monotonic()
    await proxy.stop()  # what is queued goes out first (within the drain bound)
    assert time.monotonic() - t0 < 5.5
    subjects = sorted(m["Subject"] for m in inbox.messages)
    assert subjects == [f"LLM budget warning: user:{u} daily (each user) at 86% of $0.01" for u in ("alice", "bob", "carol", "dave")]
    assert mailer_of(proxy).sent == 4


async def test_a_full_queue_drops_and_counts_instead_of_waiting(caplog, tmp_path):
    """Alerts wait for the sender in a bounded queue; past it they are dropped, counted and
    logged once, and the put never blocks (the sink runs on the call's path)."""
    cfg = EmailConfig(host="127.0.0.1", sender=SENDER, to=tuple(TO), port=free_port(), tls="none")
    mailer = Mailer(cfg, tmp_path / "cost.jsonl", time.time, 0.8, summary=False)  # not started: nothing drains
    s = BudgetState(Limit("user", "daily", 10**8), "alice", 9 * 10**7, 0, FIXED_NOW - 3600, FIXED_NOW + 3600)
    t0 = time.monotonic()
    for _ in range(QUEUE_SIZE + 5):
        mailer.alert("warning", s)
    assert time.monotonic() - t0 < 0.5
    assert (mailer.queue.qsize(), mailer.dropped) == (QUEUE_SIZE, 5)
    assert len([r for r in caplog.records if "further alerts are dropped" in r.getMessage()]) == 1


# --- TLS ----------------------------------------------------------------------------------


def make_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the client trusts it via SSL_CERT_FILE)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "smtp-cert.pem", tmp_path / "smtp-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.parametrize("tls", ["starttls", "ssl"])
async def test_tls_modes_verify_the_servers_certificate(mock: MockUpstream, start_proxy, servers, monkeypatch, tmp_path, tls: str):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    cert, key = make_certificate(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the one CA the client's default context trusts
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    inbox = Inbox()
    if tls == "starttls":  # the login only after STARTTLS, as a real submission server wants it
        smtp = await servers(inbox, tls_context=server_ctx, require_starttls=True, auth_require_tls=True)
    else:
        smtp = await servers(inbox, ssl_context=server_ctx)
    mock.on("/v1/chat/completions", echo_usage())
    budgets = {"warn_at": 0.5, "limits": [{"scope": "user", "period": "daily", "usd": 0.01}]}
    proxy = await start_proxy(proxy_config(mock.url, email_config(smtp.port, tls=tls), budgets), clock=lambda: FIXED_NOW)
    async with client(proxy.url) as c:
        assert (await timed_call(c))[1] == 200
    (msg,) = await inbox.wait(1)
    assert msg["Subject"].startswith("LLM budget warning: user:alice daily (each user) at 86%")
    assert inbox.logins == [(USER.encode(), PASSWORD.encode())]


# --- properties -----------------------------------------------------------------------------

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe", "Pacific/Chatham"]


@settings(max_examples=200, deadline=None)
@given(
    now=st.floats(min_value=1.7e9, max_value=2.2e9, allow_nan=False),
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
    zone=st.sampled_from(ZONES),
)
def test_the_next_summary_time_is_the_next_wall_clock_match(now: float, hour: int, minute: int, zone: str):
    tz = ZoneInfo(zone)
    hhmm = f"{hour:02d}:{minute:02d}"
    at = next_summary_time(now, hhmm, tz)
    assert now < at <= now + 26 * 3600  # a day, give or take a DST change
    assert next_summary_time(at - 0.001, hhmm, tz) == at  # nothing earlier matches
    local = dt.datetime.fromtimestamp(at, tz)
    if (local.hour, local.minute) != (hour, minute):  # only a wall time the clocks skip (spring forward) moves
        wall = dt.datetime.combine(local.date(), dt.time(hour, minute), tzinfo=tz)
        back = dt.datetime.fromtimestamp(wall.timestamp(), tz)
        assert (back.hour, back.minute) != (hour, minute) and back.timestamp() == at


TEXT = st.text(st.characters(codec="utf-8"), max_size=80)


@settings(max_examples=80, deadline=None)
@given(value=TEXT, event=st.sampled_from(["warning", "limit"]), spent=st.integers(0, 10**12), reserved=st.integers(0, 10**10))
def test_any_budget_name_makes_a_one_line_subject(value: str, event: str, spent: int, reserved: int):
    """Budget names carry user ids from request headers and bodies: whatever they hold, the
    message composes and its subject stays one line (no header injection)."""
    s = BudgetState(Limit("user", "daily", 5 * 10**10), value, spent, reserved, FIXED_NOW - 3600, FIXED_NOW + 3600)
    out = budget_message(event, s, 0.8, "host\r\nBcc: x@y.z")
    cfg = EmailConfig(host="127.0.0.1", sender=SENDER, to=tuple(TO))
    raw = compose(cfg, out).as_bytes(policy=email.policy.SMTP)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert "\n" not in str(parsed["Subject"]) and "\r" not in str(parsed["Subject"])
    assert parsed["Bcc"] is None and parsed["To"] == ", ".join(TO)
    assert isinstance(out, Outgoing) and out.subject.startswith("LLM budget")
