"""Records of schema version 1 read as version 2 by every reader.

Version 2 changed what ``endpoint`` means: the path the client called on the proxy
(``/openai/v1/chat/completions``, as the user guide has it), where version 1 wrote the
path after the provider's name (``/v1/chat/completions``). A log written across the
upgrade holds both; every reader must see one meaning, or a ``--group-by endpoint``
report splits one API in two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.records import SCHEMA_VERSION, upgrade_record
from proxy.core.timestamps import iso_ms
from proxy.engine.query import Query
from proxy.storage.logfiles import records_since
from proxy.storage.scan import iter_selected, scan

T0 = 1_764_000_000.0

names = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters="/?#"), min_size=1, max_size=20)
paths = st.lists(
    st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters="/?#"), min_size=1, max_size=12),
    min_size=1,
    max_size=4,
).map(lambda parts: "/" + "/".join(parts))


def record(version: int, provider: str, endpoint: str | None, i: int) -> dict[str, Any]:
    return {
        "schema_version": version,
        "timestamp": iso_ms(T0 + i),
        "record_id": f"r{version}-{i}",
        "provider": provider,
        "model": "gpt-4o",
        "endpoint": endpoint,
        "status": 200,
        "error": None,
        "input_tokens": 10,
        "output_tokens": 5,
        "total_tokens": 15,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "input_cost": 0.001,
        "output_cost": 0.002,
        "total_cost": 0.003,
    }


def write_log(path: Path, recs: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))


def test_the_writer_writes_the_current_version() -> None:
    assert SCHEMA_VERSION == 2


@settings(max_examples=60, deadline=None)
@given(provider=names, endpoint=paths)
def test_a_version_1_endpoint_becomes_the_path_the_client_called(provider: str, endpoint: str) -> None:
    old = record(1, provider, endpoint, 0)
    new = upgrade_record(dict(old))
    assert new["schema_version"] == 2
    assert new["endpoint"] == f"/{provider}{endpoint}"
    assert {k: v for k, v in new.items() if k not in ("endpoint", "schema_version")} == {
        k: v for k, v in old.items() if k not in ("endpoint", "schema_version")
    }
    # Version 2 records, and a version 1 record without an endpoint, are left as they are.
    assert upgrade_record(dict(new)) == new
    assert upgrade_record(record(1, provider, None, 0))["endpoint"] is None


def test_every_reader_sees_one_endpoint_across_the_upgrade(tmp_path: Path) -> None:
    log = tmp_path / "cost-tracking.jsonl"
    called = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages", "local": "/chat/completions"}
    recs = []
    for i in range(60):
        provider = list(called)[i % 3]
        if i < 30:  # the old writer: the path after the provider
            recs.append(record(1, provider, called[provider], i))
        else:
            recs.append(record(2, provider, f"/{provider}{called[provider]}", i))
    write_log(log, recs)
    want = {f"/{p}{e}": 20 for p, e in called.items()}

    for use_index in (False, True, True):  # the second indexed run answers from the index
        res = scan([log], Query(dims=("endpoint",)), jobs=1, use_index=use_index)
        assert {k[0]: v.requests for k, v in res.rollup(["endpoint"]).items()} == want

    selected = list(iter_selected([log], Query(dims=())))
    assert {r["endpoint"] for r in selected} == set(want)
    assert all(r["schema_version"] == 2 for r in selected)

    since = list(records_since(log, T0 - 60))
    assert len(since) == 60 and {r["endpoint"] for r in since} == set(want)

    only = list(iter_selected([log], Query(dims=(), providers=("local",))))
    assert [r["endpoint"] for r in only] == ["/local/chat/completions"] * 20
