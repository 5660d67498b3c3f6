"""Email over SMTP (``alerts.email``, docs/alerts.md): budget alerts and the daily summary.

Nothing here may slow or fail a call. A budget alert is queued by a synchronous sink (a
non-blocking put on a bounded queue; when it is full the alert is dropped and counted)
and sent by a background task; the blocking work (smtplib, and reading the log for the
summary) runs in threads, never on the event loop. A failed send is logged once per
day (in the email's time zone), with its reason and never the password, then quietly
counted until a send succeeds again."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import socket
import ssl
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Callable
from zoneinfo import ZoneInfo

from aiohttp import web

from proxy.budgets import BudgetState
from proxy.core.money import format_usd, format_usd_places
from proxy.core.periods import iso
from proxy.core.text import printable
from proxy.errors import UsageError
from proxy.outputs import EmailConfig
from proxy.reports.build import aggregate, prepare, scan_warnings
from proxy.reports.request import ReportRequest
from proxy.reports.summary import lower_bound_counts, render_summary
from proxy.web.state import ProxyState

log = logging.getLogger("proxy")

# Alerts waiting to be sent; one per budget and period, so this is only reached when the
# SMTP server has been down through a burst of per-user budgets.
QUEUE_SIZE = 200
# Messages sent over one SMTP session.
BATCH = 50
# At shutdown, how long what is queued may take to go out before it is given up.
DRAIN_SECONDS = 5.0
# The scheduler looks at the clock again at least this often: a suspended machine or a
# clock step must not make it miss (or repeat) the day's summary by hours.
RECHECK_SECONDS = 60.0
# The guide's cron line: ``analyze_costs.py --since 24 --format summary``.
SUMMARY_HOURS = "24"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message before it is composed: ``kind`` is "warning", "limit" or "summary"."""

    kind: str
    subject: str
    body: str


# --- what is sent ---------------------------------------------------------------------


def percent_text(s: BudgetState) -> str:
    """The budget's use as the log line says it: a floor percentage, "over 100" for a
    limit of 0 with spend."""
    return "over 100" if s.fraction == float("inf") else str(int(s.fraction * 100))


def budget_message(event: str, s: BudgetState, warn_at: float, proxy_host: str) -> Outgoing:
    """The alert for ``event`` ("warning": the budget crossed ``warn_at``; "limit": it
    refused a call) with the budget's figures, exact USD as budgets print them."""
    name = printable(s.name, 200)
    pct = percent_text(s)
    used, limit = format_usd(s.used, exact=True), format_usd(s.limit.units, exact=True)
    remaining = format_usd(s.remaining, exact=True)
    resets = iso(s.end)
    if s.limit.period is None:
        period = "none (a session budget does not reset)"
    else:
        period = f"{s.limit.period}, {iso(s.start)} to {resets}"
    if event == "warning":
        subject = f"LLM budget warning: {name} at {pct}% of {limit}"
        intro = f"The budget {name} is at {pct}% of its limit (warnings from {int(round(warn_at * 100))}%)."
    else:
        subject = f"LLM budget limit reached: {name} ({used} of {limit} used)"
        intro = (
            f"The budget {name} refused a call: until it resets, calls that could cost more than the "
            f"{remaining} remaining are refused (HTTP 429)."
        )
    lines = [
        textwrap.fill(intro, 76, break_long_words=False, break_on_hyphens=False),  # plain 7-bit lines, no quoted-printable
        "",
        f"Budget:     {name}",
        f"Used:       {pct}% ({used} of {limit})",
        f"Spent:      {format_usd(s.spent, exact=True)}",
        f"In flight:  {format_usd(s.reserved, exact=True)} (held for calls in progress)",
        f"Limit:      {limit}",
        f"Remaining:  {remaining}",
        f"Period:     {period}",
        f"Resets at:  {resets or 'never'}",
        f"Proxy:      {printable(proxy_host, 200)}",
        "",
        "Sent once per budget and period by llm-cost-proxy (alerts.email, config.yml).",
    ]
    return Outgoing(event, subject, "\n".join(lines) + "\n")


def summary_request(log_path: Path) -> ReportRequest:
    """``python -m proxy report --since 24 --format summary --log-file LOG`` as a request;
    one process (``jobs``), as forking a server with threads is not safe."""
    return ReportRequest(file=(str(log_path),), since=SUMMARY_HOURS, format="summary", jobs=1)


def build_summary(log_path: Path, at: float) -> Outgoing:
    """The daily summary for the 24 hours up to ``at``: the report the guide's cron line
    mails, as text, with its total in the subject. Blocking (reads the log): run it in a
    thread. Raises UsageError when there is no log."""
    now = datetime.fromtimestamp(at, UTC)
    prepared = prepare(summary_request(log_path), now)
    report = aggregate(prepared, jobs=1)
    for warning in prepared.warnings + scan_warnings(report.res):
        log.warning("email: daily summary: %s", warning)
    t = report.res.totals()
    bound = "at least " if lower_bound_counts(t) else ""
    n = f"{t.requests} request{'' if t.requests == 1 else 's'}"
    subject = f"Daily LLM Costs: {bound}{format_usd_places(t.total_cost)}, {n} (last 24 hours)"
    return Outgoing("summary", subject, render_summary(report))


def next_summary_time(now: float, hhmm: str, tz: ZoneInfo) -> float:
    """The first instant after ``now`` that is ``hhmm`` on the wall clock in ``tz``. A
    time the clocks skip (spring forward) is taken as the same distance past the change,
    as zoneinfo resolves it."""
    hour, minute = (int(x) for x in hhmm.split(":"))
    day = datetime.fromtimestamp(now, tz).date()
    for _ in range(3):
        at = datetime.combine(day, time(hour, minute), tzinfo=tz).timestamp()
        if at > now:
            return at
        day += timedelta(days=1)
    raise AssertionError("unreachable: a wall-clock time recurs within three days")


def compose(cfg: EmailConfig, out: Outgoing) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = cfg.sender
    msg["To"] = ", ".join(cfg.to)
    msg["Subject"] = printable(out.subject, 400)
    msg["Date"] = format_datetime(datetime.now(UTC))
    # The sender's domain, not getfqdn(): that can wait on DNS.
    msg["Message-ID"] = make_msgid("llm-cost", domain=cfg.sender.rpartition("@")[2])
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to an alert
    msg["X-LLM-Cost-Proxy"] = out.kind
    msg.set_content(out.body)
    return msg


def deliver(cfg: EmailConfig, outgoing: list[Outgoing]) -> tuple[int, Exception | None]:
    """Send ``outgoing`` over one SMTP session (blocking: run it in a thread). Returns how
    many went out, and the error that stopped the rest (None: all sent)."""
    sent = 0
    try:
        context = ssl.create_default_context()
        if cfg.tls == "ssl":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(cfg.host, cfg.port, timeout=cfg.timeout, context=context)
        else:
            smtp = smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout)
        try:
            if cfg.tls == "starttls":
                smtp.starttls(context=context)
            if cfg.user is not None:
                smtp.login(cfg.user, cfg.password or "")
            for out in outgoing:
                smtp.send_message(compose(cfg, out))
                sent += 1
        finally:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                smtp.close()  # the messages went; a server that hangs up first is not a failure
    except (smtplib.SMTPException, OSError, ValueError) as e:
        return sent, e
    return sent, None


# --- sending --------------------------------------------------------------------------


class Mailer:
    """The queue, the sender task and the daily scheduler for one ``alerts.email``."""

    def __init__(self, cfg: EmailConfig, log_path: Path, clock: Callable[[], float], warn_at: float, summary: bool) -> None:
        self.cfg = cfg
        self.log_path = log_path
        self.clock = clock
        self.warn_at = warn_at
        self.summary = summary and cfg.daily_summary is not None
        self.tz = ZoneInfo(cfg.timezone)
        self.proxy_host = socket.gethostname()
        self.queue: asyncio.Queue[Outgoing] = asyncio.Queue(QUEUE_SIZE)
        self.sent = 0
        self.failed = 0  # messages the server did not take
        self.dropped = 0  # alerts dropped because the queue was full
        self._quiet_day: date | None = None  # a failure was logged this day: quiet till it ends or a send works
        self._unlogged = 0  # messages lost (failed or dropped) since sending last worked
        self._pool: ThreadPoolExecutor | None = None
        self._sending = 0  # messages of the batch being sent now
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def server(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    def alert(self, event: str, s: BudgetState) -> None:
        """The ``state.alert_sinks`` entry: on the call's own path, so only a put."""
        self.enqueue(budget_message(event, s, self.warn_at, self.proxy_host))

    def enqueue(self, out: Outgoing) -> bool:
        try:
            self.queue.put_nowait(out)
        except asyncio.QueueFull:
            self.dropped += 1
            self._unlogged += 1
            if self.dropped == 1:
                log.warning("email: %d messages waiting to be sent; further alerts are dropped until some go out", QUEUE_SIZE)
            return False
        return True

    async def start(self, app: web.Application) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="smtp")
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._send_loop()))
        if self.summary:
            self._tasks.append(loop.create_task(self._daily_loop()))

    async def stop(self, app: web.Application) -> None:
        """Send what is queued (``DRAIN_SECONDS`` at most), then stop."""
        if self._tasks:
            sender, *others = self._tasks
            for task in others:
                task.cancel()
            if not sender.done():
                try:
                    await asyncio.wait_for(self.queue.join(), DRAIN_SECONDS)
                except TimeoutError:
                    log.warning(
                        "email: stopped with %d message(s) not sent (%s did not take them within %g s)",
                        self.queue.qsize() + self._sending,
                        self.server,
                        DRAIN_SECONDS,
                    )
                sender.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while len(batch) < BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            self._sending = len(batch)
            try:
                sent, error = await loop.run_in_executor(self._pool, deliver, self.cfg, batch)
            except Exception as e:  # a fault of ours in composing must not end every later send
                sent, error = 0, e
            try:
                self._outcome(batch, sent, error)
            finally:
                self._sending = 0
                for _ in batch:
                    self.queue.task_done()

    def _outcome(self, batch: list[Outgoing], sent: int, error: Exception | None) -> None:
        self.sent += sent
        today = datetime.fromtimestamp(self.clock(), self.tz).date()
        if error is None:
            if self._quiet_day is not None or self._unlogged:
                log.info("email: sending to %s works again; %d message(s) could not be sent before", self.server, self._unlogged)
            self._quiet_day, self._unlogged = None, 0
            return
        lost = len(batch) - sent
        if lost <= 0:
            return
        self.failed += lost
        self._unlogged += lost
        if self._quiet_day == today:
            return
        self._quiet_day = today
        log.warning(
            "email: could not send %r%s via %s: %s (further failures are not logged today unless a send succeeds first)",
            printable(batch[sent].subject, 200),
            f" and {lost - 1} more" if lost > 1 else "",
            self.server,
            self._reason(error),
        )

    def _reason(self, error: Exception) -> str:
        text = f"{type(error).__name__}: {error}"
        if self.cfg.password:
            text = text.replace(self.cfg.password, "***")
        return printable(text, 300)

    async def _daily_loop(self) -> None:
        assert self.cfg.daily_summary is not None
        target = next_summary_time(self.clock(), self.cfg.daily_summary, self.tz)
        while True:
            wait = target - self.clock()
            if wait > 0:
                await asyncio.sleep(min(wait, RECHECK_SECONDS))
                continue
            # Woken long after the time (a suspended machine): the last 24 hours up to now.
            now = self.clock()
            await self._send_summary(target if now - target < RECHECK_SECONDS * 2 else now)
            # A clock far past the target (a machine woken after days) gets one summary, not many.
            target = next_summary_time(max(self.clock(), target), self.cfg.daily_summary, self.tz)

    async def _send_summary(self, at: float) -> None:
        try:
            out = await asyncio.to_thread(build_summary, self.log_path, at)
        except UsageError as e:
            log.warning("email: no daily summary: %s", e)
            return
        except Exception:  # a log that cannot be read (or a fault of ours) must not end the schedule
            log.exception("email: no daily summary: reading %s failed", printable(str(self.log_path), 400))
            return
        self.enqueue(out)


MAILER = web.AppKey("mailer", Mailer)


def setup_email(app: web.Application, state: ProxyState, log_path: Path, clock: Callable[[], float], summary: bool = True) -> Mailer | None:
    """With ``alerts.email``: the budget-alert sink, the sender and (with
    daily_summary) the scheduler, started and stopped with the app. ``clock`` is the
    app's (create_app's), so tests can place the summary time a second away.
    ``summary``: False in all workers of ``serve --workers N`` but the first, so the
    summary is sent once."""
    config = state.config
    cfg = config.alerts.email
    if cfg is None:
        return None
    here = summary
    summary = cfg.daily_summary is not None and config.cost_tracking and here
    if cfg.daily_summary is not None and not config.cost_tracking:
        log.warning("email: no daily summary with cost tracking off (it is read from the log)")
    warn_at = config.budgets.warn_at if config.budgets is not None else 0.8
    mailer = Mailer(cfg, log_path, clock, warn_at, summary)
    if cfg.budget_alerts:
        state.alert_sinks.append(mailer.alert)
    app[MAILER] = mailer
    app.on_startup.append(mailer.start)
    app.on_cleanup.append(mailer.stop)
    what = [
        w for w, on in (("budget alerts", cfg.budget_alerts), (f"a daily summary at {cfg.daily_summary} {cfg.timezone}", summary)) if on
    ]
    if what:
        log.info("email: %s to %s via %s (%s)", " and ".join(what), ", ".join(cfg.to), mailer.server, cfg.tls)
    return mailer
