"""Attribution: who made a call and what for, from each source, cleaned so that nothing a
client sends can break a JSON line, a log line or a CSV cell; and never forwarded upstream."""

from __future__ import annotations

import csv
import io
import json

import aiohttp
import anthropic
import openai
import pytest
from multidict import CIMultiDict

from proxy.core.attribution import MAX_TAGS, Owner, attribute, clean_tag_name, clean_value, header_tags, is_proxy_header
from proxy.core.records import fingerprint
from tests.support.config import CLIENT_ANTHROPIC_KEY, CLIENT_GEMINI_KEY, CLIENT_OPENAI_KEY
from tests.support.mock_upstream import json_reply
from tests.support.provider_replies import anthropic_message, gemini_response, openai_chat

# --- cleaning -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("alice", "alice"),
        ("  alice   smith ", "alice smith"),  # whitespace collapsed
        ("a\tb\r\nc", "a b c"),  # a newline would split a log line
        ("a\x00b\x1b[31mc\x7f", "a b [31mc"),  # NUL, an ANSI escape, DEL
        ("x\u2028y\u2029z\x85w", "x y z w"),  # Unicode line/paragraph separators
        ("\u202egnp.exe", "gnp.exe"),  # a bidi override that would make it display reversed
        ("\ud800lone", "lone"),  # a lone surrogate cannot be written as UTF-8 JSON
        ("ユーザー 7", "ユーザー 7"),  # other scripts are kept
        ('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")'),  # spreadsheet formulas
        ("+1-555", "'+1-555"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        (" \t=cmd", "'=cmd"),  # a formula hidden behind whitespace
        ("", None),
        (" \n\t ", None),
        (None, None),
        (42, None),
    ],
)
def test_clean_value(raw, clean):
    assert clean_value(raw) == clean


def test_clean_value_caps_the_length():
    assert clean_value("a" * 10_000) == "a" * 128
    assert len(clean_value("é" * 500)) == 128
    assert clean_value("x " * 200).endswith("x")  # never ends in a cut-off space


@pytest.mark.parametrize(
    "name,ok",
    [
        ("feature", "feature"),
        ("Cost-Center", "cost-center"),
        ("a_b-9", "a_b-9"),
        ("", None),
        ("a" * 41, None),
        ("a b", None),
        ("ünï", None),
        ("x.y", None),
    ],
)
def test_tag_names(name, ok):
    assert clean_tag_name(name) == ok


def test_header_tags_precedence_and_limit():
    headers = [
        ("X-Feature", "search"),
        ("x-tag-feature", "ignored: x-feature wins"),
        ("X-Category", "=1+1"),
        ("x-project", "apollo"),
        ("x-tag-Cost-Center", "cc-7"),
        ("x-tag-", "no name"),
        ("x-tag-bad.name", "v"),
        ("x-tag-empty", "  "),
    ]
    headers += [(f"x-tag-t{i}", str(i)) for i in range(30)]
    tags = header_tags(headers)
    assert list(tags)[:4] == ["feature", "category", "project", "cost-center"]
    assert tags["feature"] == "search" and tags["category"] == "'=1+1" and tags["cost-center"] == "cc-7"
    assert "empty" not in tags and "bad.name" not in tags
    assert len(tags) == MAX_TAGS


def test_attribution_precedence():
    h = CIMultiDict({"x-user-id": "header-user", "x-session-id": "s-1"})
    # 1. the proxy key's owner, 2. x-user-id, 3. the body, 4. the key's fingerprint
    assert attribute(h, "body-user", Owner("owner", "team-a"), "abc").user_id == "owner"
    assert attribute(h, "body-user", Owner(None, "team-a"), "abc").user_id == "header-user"  # a team (service) key
    assert attribute(CIMultiDict(), "body-user", None, "abc").user_id == "body-user"
    assert attribute(CIMultiDict(), None, None, "abc").user_id == "key:abc"
    assert attribute(CIMultiDict(), None, None, None).user_id is None
    a = attribute(h, None, Owner("owner", "team-a"), "abc")
    assert (a.team, a.session_id, a.tags) == ("team-a", "s-1", {})
    assert attribute(CIMultiDict({"x-user-id": "\n"}), "body", None, None).user_id == "body"  # nothing left: next source


def test_proxy_headers_are_recognised():
    for name in ("x-user-id", "x-session-id", "x-feature", "x-category", "x-project", "x-tag-anything", "x-budget-override"):
        assert is_proxy_header(name)
    for name in ("authorization", "x-api-key", "anthropic-version", "x-stainless-lang", "x-tagged"):
        assert not is_proxy_header(name)


# --- end to end -------------------------------------------------------------------------------

HOSTILE = {
    "x-user-id": 'eve\t\t {"forged":true}',  # (aiohttp's client refuses other control characters)
    "x-session-id": "sess-42",
    "x-feature": "search",
    "x-category": '=HYPERLINK("http://evil","click")',
    "x-project": "apollo",
    "x-tag-ticket": "@SUM(1+1)\u202e",
    "x-tag-Cost-Center": "cc\t7",
}


async def test_every_source_reaches_the_record_cleaned_and_none_goes_upstream(mock, proxy):
    mock.on("/v1/chat/completions", openai_chat(mock))
    mock.on("/v1/messages", json_reply(anthropic_message()))
    mock.on(
        "/v1beta/models/gemini-2.5-flash:generateContent",
        json_reply(gemini_response(usage={"promptTokenCount": 5, "candidatesTokenCount": 2, "totalTokenCount": 7})),
    )
    msgs = [{"role": "user", "content": "hi"}]
    async with aiohttp.ClientSession() as s:  # raw: the SDKs' HTTP client refuses non-ASCII header values
        async with s.post(
            f"{proxy.url}/openai/v1/chat/completions",
            json={"model": "gpt-4o", "messages": msgs},
            headers={"Authorization": f"Bearer {CLIENT_OPENAI_KEY}", **HOSTILE},
        ) as r:
            assert r.status == 200
    async with openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
        await c.chat.completions.create(model="gpt-4o", messages=msgs, user="body-user")  # OpenAI `user`
        await c.chat.completions.create(model="gpt-4o", messages=msgs)  # nothing: the key's fingerprint
    async with anthropic.AsyncAnthropic(base_url=f"{proxy.url}/anthropic", api_key=CLIENT_ANTHROPIC_KEY, max_retries=0) as a:
        await a.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=msgs, metadata={"user_id": "anth-user"})
    async with aiohttp.ClientSession() as s:
        url = f"{proxy.url}/gemini/v1beta/models/gemini-2.5-flash:generateContent"
        async with s.post(
            url, json={"contents": [{"parts": [{"text": "hi"}]}]}, headers={"x-goog-api-key": CLIENT_GEMINI_KEY, "x-project": "gem"}
        ) as r:
            assert r.status == 200
    raw = await proxy.wait_raw_log(5)
    records = await proxy.records()
    assert len(raw.splitlines()) == 5 and raw == proxy.raw_log()  # and nothing came after
    first = records[0]
    assert first["user_id"] == 'eve {"forged":true}'
    assert first["session_id"] == "sess-42" and first["team"] is None
    assert first["tags"] == {
        "feature": "search",
        "category": '\'=HYPERLINK("http://evil","click")',
        "project": "apollo",
        "ticket": "'@SUM(1+1)",
        "cost-center": "cc 7",
    }
    assert records[1]["user_id"] == "body-user" and records[1]["tags"] == {} and records[1]["session_id"] is None
    assert records[2]["user_id"] == f"key:{fingerprint(CLIENT_OPENAI_KEY)}"
    assert records[3]["user_id"] == "anth-user"
    assert records[4]["user_id"] == f"key:{fingerprint(CLIENT_GEMINI_KEY)}" and records[4]["tags"] == {"project": "gem"}
    assert all(r["budget_override"] is False for r in records)
    # What the provider saw: none of the attribution headers.
    for req in mock.requests:
        assert not [
            h for h in req.headers if h.lower().startswith(("x-user", "x-session", "x-feature", "x-category", "x-project", "x-tag-"))
        ]
    # A CSV export of these values cannot start a formula in any cell.
    buf = io.StringIO()
    w = csv.writer(buf)
    for r in records:
        w.writerow([r["user_id"], r["session_id"], *r["tags"].values()])
    for row in csv.reader(io.StringIO(buf.getvalue())):
        assert not any(cell.startswith(("=", "+", "-", "@")) for cell in row), row


async def test_body_user_is_cleaned_too(mock, proxy):
    mock.on("/v1/chat/completions", openai_chat(mock))
    async with openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
        await c.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], user='-x\n{"forged":1}\x1b]0;title\x07' + "y" * 300
        )
    [rec] = await proxy.records()
    assert rec["user_id"].startswith('\'-x {"forged":1} ]0;title y') and len(rec["user_id"]) == 128
    assert len(proxy.raw_log().splitlines()) == 1 and json.loads(proxy.raw_log())["user_id"] == rec["user_id"]
    # the body itself goes upstream untouched: it is the provider's field too
    assert mock.requests[0].json["user"].startswith("-x\n{")


PASTED_KEYS = [
    "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
    "sk-ant-api03-AbCdEfGhIjKlMnOpQrSt",
    "AIzaSyAbCdEfGhIjKlMnOpQrStUvWxYz0123456",
]
# Ordinary names that share a prefix with a key and must stay as they are.
LOOKALIKES = ["risk-assessment", "task-manager-for-the-quarter-2026", "sk-short", "desk-booking-assistant-v2-prod"]


async def test_a_key_pasted_as_a_user_or_tag_never_reaches_the_log(mock, proxy):
    """Before: x-user-id and x-tag-* values were written as sent, so a key pasted there
    was in every record of that client (never a secret in a record: DEVELOPERS.md)."""
    mock.on("/v1/chat/completions", openai_chat(mock))
    async with aiohttp.ClientSession() as http:
        for key in PASTED_KEYS:
            headers = {"Authorization": f"Bearer {CLIENT_OPENAI_KEY}", "x-user-id": f"svc {key}", "x-feature": key}
            async with http.post(f"{proxy.url}/openai/v1/chat/completions", json={"model": "gpt-4o", "messages": []}, headers=headers) as r:
                assert r.status == 200
        for name in LOOKALIKES:
            headers = {"Authorization": f"Bearer {CLIENT_OPENAI_KEY}", "x-user-id": name, "x-feature": name}
            async with http.post(f"{proxy.url}/openai/v1/chat/completions", json={"model": "gpt-4o", "messages": []}, headers=headers) as r:
                assert r.status == 200
    raw = proxy.raw_log()
    assert not any(key in raw for key in PASTED_KEYS)
    records = await proxy.records()
    assert [r["user_id"] for r in records[:3]] == ["svc [redacted]"] * 3
    assert [r["tags"]["feature"] for r in records[:3]] == ["[redacted]"] * 3
    assert [(r["user_id"], r["tags"]["feature"]) for r in records[3:]] == [(n, n) for n in LOOKALIKES]


def test_clean_value_masks_only_key_shaped_words() -> None:
    for key in PASTED_KEYS:
        assert clean_value(f"note {key} end") == "note [redacted] end"
    for name in LOOKALIKES:
        assert clean_value(name) == name
