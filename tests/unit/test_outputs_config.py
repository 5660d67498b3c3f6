"""The ``replies:``, ``metrics:`` and ``alerts:`` sections of config.yml: good ones read as
written, a bad one stops start-up naming the file, the key path and the reason."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import parse_config
from proxy.errors import ConfigError
from tests.support.config import make_config

EMAIL = {"host": "127.0.0.1", "from": "proxy@example.com", "to": "ops@example.com"}


def cfg(**sections: Any) -> dict[str, Any]:
    return {**make_config("http://127.0.0.1:1"), **sections}


def test_defaults_and_a_full_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    d = parse_config(cfg())
    assert (d.replies.cost_headers, d.replies.stream_comment, d.metrics.enabled, d.metrics.labels) == (True, True, True, ())
    assert d.alerts.email is None
    monkeypatch.setenv("SMTP_PW", "s3cret-pw")
    monkeypatch.setenv("SCRAPE", "tok-123")
    c = parse_config(
        cfg(
            replies={"cost_headers": False, "stream_comment": False},
            metrics={"labels": ["user", "tag:project"], "max_label_values": 7, "scrape_token_env": "SCRAPE"},
            budgets={"timezone": "Europe/Berlin", "limits": [{"scope": "global", "period": "daily", "usd": 5}]},
            alerts={"email": {**EMAIL, "to": ["a@x.org", "b@y.org"], "tls": "ssl", "user": "u", "password_env": "SMTP_PW"}},
        )
    )
    assert (c.replies.cost_headers, c.replies.stream_comment) == (False, False)
    assert (c.metrics.labels, c.metrics.max_label_values, c.metrics.scrape_token) == (("user", "tag:project"), 7, "tok-123")
    email = c.alerts.email
    assert email is not None
    assert (email.port, email.tls, email.to, email.password) == (465, "ssl", ("a@x.org", "b@y.org"), "s3cret-pw")
    assert email.timezone == "Europe/Berlin"  # the budgets' zone unless given
    assert "s3cret-pw" not in repr(c) and "tok-123" not in repr(c)


@pytest.mark.parametrize(
    "sections, key, reason",
    [
        ({"replies": {"cost_header": True}}, "replies.cost_header", "did you mean 'cost_headers'"),
        ({"replies": {"stream_comment": "yes"}}, "replies.stream_comment", "true or false"),
        ({"metrics": {"labels": "user"}}, "metrics.labels", "a list"),
        ({"metrics": {"labels": ["user", "key"]}}, "metrics.labels[1]", "user, team or tag:NAME"),
        ({"metrics": {"labels": ["tag:Bad Name"]}}, "metrics.labels[0]", "tag:NAME"),
        ({"metrics": {"labels": ["team", "team"]}}, "metrics.labels[1]", "twice"),
        ({"metrics": {"max_label_values": 0}}, "metrics.max_label_values", "1 to 100000"),
        ({"metrics": {"scrape_token_env": "NOT_SET_ANYWHERE_42"}}, "metrics.scrape_token_env", "NOT_SET_ANYWHERE_42 is not set"),
        ({"alerts": {"email": {**EMAIL, "tls": "yes"}}}, "alerts.email.tls", "starttls, ssl, none"),
        ({"alerts": {"email": {"from": "a@b.c", "to": "d@e.f"}}}, "alerts.email.host", "required"),
        ({"alerts": {"email": {**EMAIL, "to": "not-an-address"}}}, "alerts.email.to", "email address"),
        ({"alerts": {"email": {**EMAIL, "to": ["a@b.c", "x"]}}}, "alerts.email.to[1]", "email address"),
        ({"alerts": {"email": {**EMAIL, "port": 70000}}}, "alerts.email.port", "65535"),
        ({"alerts": {"email": {**EMAIL, "password_env": "PW_NOT_SET_42", "user": "u"}}}, "alerts.email.password_env", "not set"),
        ({"alerts": {"email": {**EMAIL, "daily_summary": "9am"}}}, "alerts.email.daily_summary", "HH:MM"),
        ({"alerts": {"email": {**EMAIL, "daily_summary": "24:00"}}}, "alerts.email.daily_summary", "HH:MM"),
        ({"alerts": {"email": {**EMAIL, "timezone": "Mars/Olympus"}}}, "alerts.email.timezone", "unknown time zone"),
        ({"alerts": {"email": {**EMAIL, "pasword_env": "X"}}}, "alerts.email.pasword_env", "did you mean 'password_env'"),
        ({"alerts": {"email": {**EMAIL, "host": "smtp\nBcc: x@y.z"}}}, "alerts.email.host", "one-line"),
    ],
)
def test_a_bad_section_names_file_key_and_reason(sections: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(cfg(**sections), "my-config.yml")
    assert (e.value.path, e.value.key) == ("my-config.yml", key)
    assert reason in e.value.reason, e.value.reason
    assert str(e.value).startswith(f"my-config.yml: {key}: ")


def test_a_password_without_a_login_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_PW", "pw")
    with pytest.raises(ConfigError) as e:
        parse_config(cfg(alerts={"email": {**EMAIL, "password_env": "SMTP_PW"}}))
    assert e.value.key == "alerts.email.user"


def test_an_unquoted_summary_time_reads_as_written() -> None:
    """YAML 1.1 makes `daily_summary: 18:30` the number 1110 (sexagesimal minutes)."""
    import yaml

    spec = yaml.safe_load("host: 127.0.0.1\nfrom: a@b.c\nto: d@e.f\ndaily_summary: 18:30\n")
    assert spec["daily_summary"] == 1110
    email = parse_config(cfg(alerts={"email": spec})).alerts.email
    assert email is not None and email.daily_summary == "18:30"
