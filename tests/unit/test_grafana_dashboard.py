"""docs/grafana-dashboard.json is an importable dashboard whose every query names only
metrics the proxy exports: the names are taken from a real scrape of an in-process
proxy after calls of every kind (so every series exists), with the _bucket, _sum and
_count series of histograms and the _total of counters as the scrape shows them."""

from __future__ import annotations

import json
import re

import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT
from tests.support.config import CLIENT_GEMINI_KEY, CLIENT_OPENAI_KEY, make_config
from tests.support.mock_upstream import json_reply
from tests.support.provider_replies import openai_chat

DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
REQUIRED = ("Cost per hour by model", "Tokens by type", "Error rate", "Latency percentiles", "Budget use")
DS = "${DS_PROMETHEUS}"
PRO = "/v1beta/models/gemini-2.5-pro:generateContent"
# PromQL words that are not metric names (aggregation modifiers, set and vector-matching operators).
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)$")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers left once strings,
    label matchers, ranges, grouping label lists and Grafana variables are taken out,
    that are no keyword and no function (not followed by a parenthesis)."""
    e = _STRING.sub('""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = _GROUPING.sub(" ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)
    return {m.group() for m in _IDENT.finditer(e) if m.group().lower() not in KEYWORDS and not e[m.end() :].lstrip().startswith("(")}


def test_metric_names_reads_promql():
    assert metric_names('sum by (model) (rate(a_total{model=~"$m", x="by(y)"}[$__rate_interval])) * 3600') == {"a_total"}
    assert metric_names("histogram_quantile(0.95, sum by (le) (rate(h_bucket[5m]))) / on(job) group_left c") == {"h_bucket", "c"}
    assert metric_names("max by (budget) (s) / max by (budget) (l > 0)") == {"s", "l"}


def load() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def queries(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and of every query variable."""
    out = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            m = _LABEL_VALUES.match(v["definition"])
            assert m, v["definition"]
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def test_dashboard_is_importable_with_a_prometheus_input():
    dash = load()
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    assert [(i["name"], i["type"], i["pluginId"]) for i in dash["__inputs"]] == [("DS_PROMETHEUS", "datasource", "prometheus")]
    [ds_var] = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert (ds_var["name"], ds_var["query"]) == ("DS_PROMETHEUS", "prometheus")  # also works when provisioned from a file
    titles = [p["title"] for p in dash["panels"]]
    assert set(REQUIRED) <= set(titles)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in dash["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": DS}, p["title"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert p["targets"] and all(t["datasource"]["uid"] == DS and t["expr"].strip() for t in p["targets"])
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    by_title = {p["title"]: p for p in dash["panels"]}
    latency = [t["expr"] for t in by_title["Latency percentiles"]["targets"]]
    assert latency and all(e.startswith("histogram_quantile(") and "_bucket" in e and "by (le)" in e for e in latency)
    [budget] = by_title["Budget use"]["targets"]
    assert metric_names(budget["expr"]) == {"llm_proxy_budget_spent_usd", "llm_proxy_budget_limit_usd"}
    assert "3600" in by_title["Cost per hour by model"]["targets"][0]["expr"]
    assert "model" in by_title["Cost per hour by model"]["targets"][0]["legendFormat"]
    for where, expr in queries(dash):
        assert metric_names(expr), (where, expr)


async def test_every_query_names_a_metric_the_proxy_exports(mock, start_proxy, http):
    mock.on("/v1/chat/completions", openai_chat(mock))
    mock.on(PRO, json_reply({"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}, status=429))
    cfg = make_config(mock.url)
    cfg["budgets"] = {"limits": [{"scope": "global", "period": "daily", "usd": 5}]}
    proxy = await start_proxy(cfg)
    async with openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=CLIENT_OPENAI_KEY, max_retries=0) as c:
        await c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        async for _ in await c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True):
            pass
    async with http.post(f"{proxy.url}/gemini{PRO}", json={"contents": []}, headers={"x-goog-api-key": CLIENT_GEMINI_KEY}) as r:
        assert r.status == 429
    await proxy.wait_records(3)
    async with http.get(f"{proxy.url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    await proxy.stop()

    families = list(text_string_to_metric_families(text))
    exported = {s.name for f in families for s in f.samples}  # with _total, _bucket, _sum, _count
    histograms = {f.name for f in families if f.type == "histogram"}
    assert histograms and exported
    for where, expr in queries(load()):
        for name in metric_names(expr):
            assert name in exported, f"{where}: {name} is not exported (exported: {sorted(exported)})"
            if name.endswith("_bucket"):
                assert name.removesuffix("_bucket") in histograms, (where, name)
