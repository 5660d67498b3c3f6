// llm-cost-proxy dashboard: plain ES2020, no framework, no build step, no network
// access beyond this proxy's own /api. Every piece of data goes into the DOM through
// textContent / setAttribute (never innerHTML), so names from the log cannot inject markup.
"use strict";

(() => {
  const KEY_STORAGE = "llm-cost-proxy.key";
  const SVGNS = "http://www.w3.org/2000/svg";
  const PRESETS = ["1", "7", "30", "90"];
  const DEFAULT_DAYS = "7";
  // Filters the API understands that have no control on the page: kept from the URL
  // and passed along, so a hand-made link still reproduces its view.
  const PASSTHROUGH = ["tz", "team", "category", "status"];
  const EMPTY_TEXT = "No requests in this period";
  const POLL_MS = 10000;
  const STREAM_RETRY_MS = 30000;
  const STREAM_SILENCE_MS = 45000; // the server pings every 15 s; three missed pings = dead
  const DEBOUNCE_MS = 500;
  const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

  const $ = (id) => document.getElementById(id);
  const intFmt = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

  const state = {
    who: null, // {role, user, auth} from /api/whoami, or null when unknown
    filters: defaultFilters(),
    sessionsSort: "recent",
    providers: new Set(), // every provider seen, so a filtered view keeps the other choices
    models: new Map(), // model -> Set of providers
    users: new Set(),
    load: null, // {ctrl} of the load in flight
    pending: false, // a live event arrived while loading: load again afterwards
    debounce: 0,
    charts: new Map(), // name -> {draw, data}, redrawn when the width changes
    tables: new Map(), // name -> {columns, rows, sort}
    live: { ctrl: null, retry: 0, poll: 0, watchdog: 0 },
  };

  // ---------------------------------------------------------------- small helpers

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function svg(tag, attrs, parent) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function svgText(parent, x, y, str, attrs) {
    const t = svg("text", { x, y, ...(attrs || {}) }, parent);
    t.textContent = str;
    return t;
  }

  function tooltip(node, str) {
    svg("title", {}, node).textContent = str;
  }

  function readKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return "";
    }
  }

  function writeKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch {
      /* storage disabled: the key lives only until the page is left */
    }
  }

  function authHeaders(extra) {
    const headers = { ...(extra || {}) };
    const key = readKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  async function errorMessage(res) {
    let text = "";
    try {
      text = await res.text();
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return String(body.error.message);
    } catch {
      /* not JSON: fall through to the status line */
    }
    return `HTTP ${res.status} ${res.statusText || ""}`.trim() + (text && text.length < 200 ? `: ${text}` : "");
  }

  async function request(path, params, signal, accept) {
    const url = params && String(params) ? `${path}?${params}` : path;
    let res;
    try {
      res = await fetch(url, { headers: authHeaders({ Accept: accept || "application/json" }), signal, cache: "no-store" });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, `cannot reach the proxy (${e.message})`);
    }
    if (!res.ok) throw new ApiError(res.status, await errorMessage(res));
    return res;
  }

  async function api(path, params, signal) {
    const res = await request(path, params, signal);
    return res.json();
  }

  // ---------------------------------------------------------------- formatting

  function trimZeros(s) {
    return s.includes(".") ? s.replace(/0+$/, "").replace(/\.$/, "") : s;
  }

  // $ + 4 decimals from one cent up, otherwise up to 6 significant digits (0.00325 -> $0.00325).
  function money(v) {
    if (v === null || v === undefined || !Number.isFinite(Number(v))) return "–";
    const n = Number(v);
    const abs = Math.abs(n);
    const sign = n < 0 ? "-" : "";
    if (abs === 0) return "$0.00";
    if (abs >= 0.01) {
      return `${sign}$${abs.toLocaleString("en-US", { minimumFractionDigits: 4, maximumFractionDigits: 4 })}`;
    }
    // toFixed, not toPrecision: toPrecision switches to 1e-7 notation for tiny costs.
    const digits = Math.min(20, 5 - Math.floor(Math.log10(abs)));
    return `${sign}$${trimZeros(abs.toFixed(digits))}`;
  }

  function int(v) {
    return v === null || v === undefined ? "–" : intFmt.format(Number(v));
  }

  function percent(fraction, digits = 1) {
    return fraction === null || fraction === undefined ? "–" : `${(Number(fraction) * 100).toFixed(digits)}%`;
  }

  function compact(n) {
    const abs = Math.abs(n);
    if (abs >= 1e9) return `${trimZeros((n / 1e9).toFixed(1))}B`;
    if (abs >= 1e6) return `${trimZeros((n / 1e6).toFixed(1))}M`;
    if (abs >= 1e3) return `${trimZeros((n / 1e3).toFixed(1))}k`;
    return String(Math.round(n));
  }

  function ms(v) {
    if (v === null || v === undefined) return "–";
    return v < 1000 ? `${Math.round(v)} ms` : `${trimZeros((v / 1000).toFixed(v < 10000 ? 2 : 1))} s`;
  }

  function dateLabel(iso) {
    // "2026-12-01" -> "Dec 1" (no Date(): the API already gave the day in its tz)
    const m = /^(\d{4})-(\d{2})-(\d{2})/.exec(iso || "");
    return m ? `${MONTHS[Number(m[2]) - 1]} ${Number(m[3])}` : String(iso);
  }

  function hourLabel(iso) {
    const m = /T(\d{2}):(\d{2})/.exec(iso || "");
    return m ? `${m[1]}:${m[2]}` : String(iso);
  }

  function timestampLabel(iso) {
    // "2026-12-01T13:04:05.123+00:00" -> "2026-12-01 13:04:05", kept in the log's own offset
    const m = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}(?::\d{2})?)/.exec(iso || "");
    return m ? `${m[1]} ${m[2]}` : String(iso || "–");
  }

  function costClass(v) {
    const n = Number(v) || 0;
    if (n > 0.1) return "cost-high";
    if (n >= 0.01) return "cost-mid";
    return "cost-low";
  }

  function costChip(v) {
    const label = { "cost-low": "under $0.01", "cost-mid": "$0.01 to $0.10", "cost-high": "over $0.10" };
    const cls = costClass(v);
    return el("span", { class: `cost ${cls}`, "data-value": v === null || v === undefined ? "" : String(v), title: label[cls], text: money(v) });
  }

  function clock(date) {
    const p = (n) => String(n).padStart(2, "0");
    return `${p(date.getHours())}:${p(date.getMinutes())}:${p(date.getSeconds())}`;
  }

  // ---------------------------------------------------------------- filters and the URL

  function defaultFilters() {
    return { range: DEFAULT_DAYS, start: "", end: "", provider: "", model: "", user: "", tag: "", extra: [] };
  }

  function filtersFromUrl() {
    const q = new URLSearchParams(location.search);
    const f = defaultFilters();
    if (q.get("start") || q.get("end")) {
      f.range = "custom";
      f.start = q.get("start") || "";
      f.end = q.get("end") || "";
    } else if (q.get("days")) {
      f.range = q.get("days");
    }
    for (const k of ["provider", "model", "user", "tag"]) f[k] = q.get(k) || "";
    for (const k of PASSTHROUGH) for (const v of q.getAll(k)) f.extra.push([k, v]);
    const sort = q.get("sessions_sort");
    if (sort) state.sessionsSort = sort;
    return f;
  }

  // The query string every /api/analytics call gets (and the page URL shows).
  function filterParams() {
    const f = state.filters;
    const p = new URLSearchParams();
    if (f.range === "custom" && (f.start || f.end)) {
      if (f.start) p.set("start", f.start);
      if (f.end) p.set("end", f.end);
    } else {
      p.set("days", f.range === "custom" ? DEFAULT_DAYS : f.range);
    }
    for (const k of ["provider", "model", "user", "tag"]) if (f[k]) p.set(k, f[k]);
    for (const [k, v] of f.extra) p.append(k, v);
    return p;
  }

  function writeUrl() {
    const p = filterParams();
    if (state.sessionsSort !== "recent") p.set("sessions_sort", state.sessionsSort);
    history.replaceState(null, "", `${location.pathname}?${p}`);
  }

  // Hourly points when the window is two days or less.
  function isShortRange() {
    const f = state.filters;
    if (f.range !== "custom" || !(f.start || f.end)) return Number(f.range) <= 2;
    if (!f.start) return false;
    const start = Date.parse(f.start.length === 10 ? `${f.start}T00:00:00Z` : f.start);
    const end = f.end ? Date.parse(f.end.length === 10 ? `${f.end}T00:00:00Z` : f.end) + (f.end.length === 10 ? 86400000 : 0) : Date.now();
    return Number.isFinite(start) && Number.isFinite(end) && end - start <= 2 * 86400000;
  }

  function ensureRangeOption(value) {
    const select = $("f-range");
    if ([...select.options].some((o) => o.value === value)) return;
    const label = /^\d+$/.test(value) ? `Last ${value} days` : `days=${value}`;
    select.insertBefore(el("option", { value, text: label }), select.querySelector('option[value="custom"]'));
  }

  function ensureOption(select, value, label) {
    if (!value || [...select.options].some((o) => o.value === value)) return;
    select.append(el("option", { value, text: label || value }));
  }

  function filtersToInputs() {
    const f = state.filters;
    ensureRangeOption(f.range);
    $("f-range").value = f.range;
    $("f-start").value = /^\d{4}-\d{2}-\d{2}$/.test(f.start) ? f.start : "";
    $("f-end").value = /^\d{4}-\d{2}-\d{2}$/.test(f.end) ? f.end : "";
    ensureOption($("f-provider"), f.provider);
    $("f-provider").value = f.provider;
    ensureOption($("f-model"), f.model);
    $("f-model").value = f.model;
    $("f-user").value = f.user;
    $("f-tag").value = f.tag;
    $("sessions-sort").value = state.sessionsSort;
  }

  function utcDate(offsetDays) {
    return new Date(Date.now() + offsetDays * 86400000).toISOString().slice(0, 10);
  }

  function onRangeChange() {
    const f = state.filters;
    f.range = $("f-range").value;
    if (f.range === "custom") {
      // Start from the last 7 days so the custom view is never empty of dates.
      if (!f.start && !f.end) {
        f.start = utcDate(-6);
        f.end = utcDate(0);
      }
    } else {
      f.start = f.end = "";
    }
    filtersToInputs();
    filtersChanged();
  }

  function onDateChange() {
    const f = state.filters;
    f.start = $("f-start").value;
    f.end = $("f-end").value;
    f.range = f.start || f.end ? "custom" : DEFAULT_DAYS;
    $("f-range").value = f.range;
    filtersChanged();
  }

  function onSelectChange(name) {
    state.filters[name] = $(`f-${name}`).value;
    filtersChanged();
  }

  // Text filters apply on change (Enter or leaving the field), not on every keystroke.
  function onTextChange() {
    const user = $("f-user").value.trim();
    const tag = $("f-tag").value.trim();
    if (tag && !/^[^=]+=/.test(tag)) {
      showError("Tag filter: write it as KEY=VALUE, e.g. feature=search.");
      $("f-tag").setAttribute("aria-invalid", "true");
      return;
    }
    $("f-tag").removeAttribute("aria-invalid");
    if (user === state.filters.user && tag === state.filters.tag) return;
    state.filters.user = user;
    state.filters.tag = tag;
    filtersChanged();
  }

  function onReset() {
    const extra = state.filters.extra;
    state.filters = defaultFilters();
    state.filters.extra = extra;
    state.sessionsSort = "recent";
    filtersToInputs();
    filtersChanged();
  }

  function filtersChanged() {
    writeUrl();
    reload();
  }

  // Provider and model choices come from the data; the union of everything seen is kept
  // so that choosing one provider does not remove the others from the list.
  function updateChoices(usage) {
    for (const p of usage.by_provider || []) state.providers.add(p.provider);
    for (const m of usage.by_model || []) {
      if (!state.models.has(m.model)) state.models.set(m.model, new Set());
      state.models.get(m.model).add(m.provider);
    }
    const provider = $("f-provider");
    for (const name of [...state.providers].sort()) ensureOption(provider, name);
    const model = $("f-model");
    for (const [name, providers] of [...state.models].sort((a, b) => a[0].localeCompare(b[0]))) {
      ensureOption(model, name, providers.size === 1 ? `${name} (${[...providers][0]})` : name);
    }
  }

  function updateUserChoices(users) {
    const list = $("f-user-list");
    for (const u of users) {
      if (!u.user || state.users.has(u.user)) continue;
      state.users.add(u.user);
      list.append(el("option", { value: u.user }));
    }
  }

  // ---------------------------------------------------------------- banner, login, role

  function showError(message) {
    $("error-text").textContent = message;
    $("error-banner").hidden = false;
  }

  function hideError() {
    $("error-banner").hidden = true;
    $("error-text").textContent = "";
  }

  function showLogin(message) {
    stopLive();
    state.who = null;
    $("dashboard").hidden = true;
    $("login").hidden = false;
    $("sign-out").hidden = true;
    $("scope").textContent = "Sign in to see the proxy's usage";
    $("key-error").textContent = message || "";
    $("key-error").hidden = !message;
    setLive("offline", "not signed in");
    $("key-input").focus();
  }

  function applyRole(who) {
    state.who = who;
    const role = who ? who.role : null;
    const isUser = role === "user";
    if (isUser) $("scope").textContent = `Your usage (user: ${who.user})`;
    else if (role === "admin") $("scope").textContent = "All usage (admin)";
    else if (role === "local") $("scope").textContent = "All usage (local access, no proxy key configured)";
    else $("scope").textContent = "All usage";
    document.body.dataset.role = role || "unknown";
    // A user's key is forced to its own user by the API: the user filter and the
    // per-user table would only show that one user, so they are hidden.
    $("f-user-field").hidden = isUser;
    $("panel-users").hidden = isUser;
    $("panel-sessions").classList.toggle("wide", isUser);
    $("sign-out").hidden = !readKey();
  }

  async function signIn() {
    let who;
    try {
      who = await api("/api/whoami");
    } catch (e) {
      if (e.status === 401) {
        showLogin(readKey() ? "That proxy key was not accepted." : "");
        return;
      }
      // No whoami (older proxy, network trouble): still show the page; each panel
      // reports its own error and the API enforces what this key may see.
      showError(`Could not check access: ${e.message}`);
      who = null;
    }
    $("login").hidden = true;
    $("dashboard").hidden = false;
    applyRole(who);
    reload();
    startLive();
  }

  function onKeySubmit(event) {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    writeKey(key);
    $("key-input").value = "";
    hideError();
    signIn();
  }

  function onSignOut(event) {
    event.preventDefault();
    writeKey("");
    if (state.load) state.load.ctrl.abort();
    hideError();
    clearData();
    showLogin("Signed out.");
  }

  // Forget everything the previous key could see, so the next key starts clean.
  function clearData() {
    state.charts.clear();
    state.tables.clear();
    state.providers.clear();
    state.models.clear();
    state.users.clear();
    for (const id of ["f-provider", "f-model"]) {
      const select = $(id);
      for (const o of [...select.options]) if (o.value && o.value !== select.value) o.remove();
    }
    $("f-user-list").replaceChildren();
    for (const node of document.querySelectorAll("[data-card]")) setCard(node.dataset.card, "–", null, "");
    $("period").textContent = "";
    $("updated").textContent = "";
    showLoading();
  }

  // ---------------------------------------------------------------- loading

  function reload() {
    // Filters changed: drop whatever is in flight and start again.
    if (state.load) state.load.ctrl.abort();
    state.pending = false;
    runLoad();
  }

  function scheduleRefresh() {
    // Live events come in bursts; refresh once they settle.
    clearTimeout(state.debounce);
    state.debounce = setTimeout(() => {
      if (state.load) state.pending = true;
      else runLoad();
    }, DEBOUNCE_MS);
  }

  async function runLoad() {
    const load = { ctrl: new AbortController() };
    state.load = load;
    try {
      await loadAll(load.ctrl.signal);
    } catch (e) {
      if (e.name !== "AbortError") showError(e.message);
    } finally {
      if (state.load === load) {
        state.load = null;
        if (state.pending) {
          state.pending = false;
          runLoad();
        }
      }
    }
  }

  async function settle(jobs) {
    const names = Object.keys(jobs);
    const results = await Promise.allSettled(names.map((n) => jobs[n]));
    const out = {};
    names.forEach((n, i) => (out[n] = results[i]));
    return out;
  }

  function withParams(base, extra) {
    const p = new URLSearchParams(base);
    for (const [k, v] of Object.entries(extra)) p.set(k, v);
    return p;
  }

  const PANEL_NAMES = {
    usage: "Usage",
    costs: "Costs",
    latency: "Latency",
    expensive: "Expensive requests",
    sessions: "Sessions",
    users: "Users",
    budgets: "Budgets",
  };

  async function loadAll(signal) {
    const p = filterParams();
    const isUser = state.who && state.who.role === "user";
    const jobs = {
      usage: api("/api/analytics/usage", isShortRange() ? withParams(p, { interval: "hour" }) : p, signal),
      costs: api("/api/analytics/costs", p, signal),
      latency: api("/api/analytics/latency", p, signal),
      expensive: api("/api/analytics/expensive-requests", withParams(p, { limit: "10" }), signal),
      sessions: api("/api/analytics/sessions", withParams(p, { sort: state.sessionsSort, limit: "15" }), signal),
      // Budgets are not a window of the log: /api/budgets takes no analytics filters.
      budgets: api("/api/budgets", null, signal),
    };
    if (!isUser) jobs.users = api("/api/analytics/users", withParams(p, { limit: "20" }), signal);
    const r = await settle(jobs);
    if (signal.aborted) return;

    const failed = Object.entries(r).filter(([, v]) => v.status === "rejected");
    if (failed.some(([, v]) => v.reason && v.reason.status === 401)) {
      showLogin(readKey() ? "The proxy key is no longer accepted." : "");
      return;
    }
    const ok = (name) => (r[name] && r[name].status === "fulfilled" ? r[name].value : null);
    const fail = (name) => (r[name] && r[name].status === "rejected" ? r[name].reason.message : "");

    renderUsage(ok("usage"), fail("usage"));
    renderCosts(ok("costs"), fail("costs"));
    renderLatency(ok("latency"), fail("latency"));
    renderExpensive(ok("expensive"), fail("expensive"));
    renderSessions(ok("sessions"), fail("sessions"));
    if (!isUser) renderUsers(ok("users"), fail("users"));
    renderBudgets(ok("budgets"), r.budgets.status === "rejected" ? r.budgets.reason : null);

    const shown = failed
      .filter(([name, v]) => !(name === "budgets" && isUser && v.reason.status === 403))
      .filter(([, v]) => v.reason.name !== "AbortError");
    if (shown.length) showError(groupErrors(shown));
    else hideError();
    $("updated").textContent = `updated ${clock(new Date())}`;
  }

  // One line per distinct message ("Usage, Costs: days must be ..."): a bad filter
  // fails every panel the same way and should read once.
  function groupErrors(failed) {
    const byMessage = new Map();
    for (const [name, v] of failed) {
      const list = byMessage.get(v.reason.message) || [];
      list.push(PANEL_NAMES[name]);
      byMessage.set(v.reason.message, list);
    }
    return [...byMessage].map(([message, names]) => `${names.join(", ")}: ${message}`).join("\n");
  }

  async function loadSessionsOnly() {
    try {
      const data = await api("/api/analytics/sessions", withParams(filterParams(), { sort: state.sessionsSort, limit: "15" }));
      renderSessions(data, "");
    } catch (e) {
      if (e.status === 401) showLogin("The proxy key is no longer accepted.");
      else showError(`Sessions: ${e.message}`);
    }
  }

  // ---------------------------------------------------------------- cards

  function setCard(name, text, value, sub) {
    const node = document.querySelector(`[data-card="${name}"]`);
    node.textContent = text;
    node.dataset.value = value === null || value === undefined ? "" : String(value);
    const subNode = $(`sub-${name}`);
    if (subNode) {
      subNode.textContent = sub || "";
      subNode.classList.remove("up", "down", "same");
    }
    return node;
  }

  function renderUsageCards(u) {
    const lower = u.cost_is_lower_bound ? `at least: ${int(u.unpriced_requests)} unpriced request(s)` : `${compact(u.total_tokens || 0)} tokens`;
    setCard("total_cost", money(u.total_cost), u.total_cost, lower);
    setCard("requests", int(u.requests), u.requests, `${int(u.errors)} error${u.errors === 1 ? "" : "s"}`);
    setCard("success_rate", percent(u.success_rate), u.success_rate, u.requests ? `${int(u.requests - u.errors)} succeeded` : "no requests");
    setCard("avg_cost", money(u.avg_cost_per_request), u.avg_cost_per_request, "per request");
  }

  function projectionText(proj) {
    if (!proj) return "not enough data yet";
    if (proj.month_to_date !== null && proj.month_to_date !== undefined) return `${proj.month}: ${money(proj.month_to_date)} so far`;
    return proj.daily_rate !== null && proj.daily_rate !== undefined ? `at ${money(proj.daily_rate)} a day` : proj.month || "";
  }

  function renderCostCards(c) {
    const proj = c.projection;
    setCard(
      "projected_month",
      money(c.projected_monthly_cost),
      c.projected_monthly_cost,
      projectionText(proj),
    );
    const today = c.compare && c.compare.today;
    const yesterday = c.compare && c.compare.yesterday;
    if (!today || !yesterday) {
      setCard("today_vs_yesterday", "–", null, "");
      return;
    }
    const t = Number(today.total_cost) || 0;
    const y = Number(yesterday.total_cost) || 0;
    let change = "";
    if (y > 0) change = `${t >= y ? "+" : ""}${(((t - y) / y) * 100).toFixed(1)}% vs ${money(yesterday.total_cost)} yesterday`;
    else change = t > 0 ? `vs ${money(yesterday.total_cost)} yesterday` : "no spend today or yesterday";
    const node = setCard("today_vs_yesterday", money(today.total_cost), today.total_cost, change);
    node.dataset.yesterday = String(yesterday.total_cost);
    // More spend than yesterday reads as a warning colour on the comparison line.
    if (y > 0 || t > 0) $("sub-today_vs_yesterday").classList.add(t > y ? "up" : t < y ? "down" : "same");
  }

  function clearCards(names) {
    for (const n of names) setCard(n, "–", null, "unavailable");
  }

  // ---------------------------------------------------------------- panels from usage / costs

  function renderUsage(u, error) {
    if (!u) {
      clearCards(["total_cost", "requests", "success_rate", "avg_cost"]);
      for (const n of ["cost_over_time", "cost_by_model", "tokens", "requests_per_day"]) chartError(n, error);
      return;
    }
    updateChoices(u);
    renderUsageCards(u);
    $("period").textContent = periodText(u.period);
    const empty = !u.requests;
    const hourly = isShortRange() && Array.isArray(u.hourly);
    $("cost-interval").textContent = hourly ? "(hourly)" : "(daily)";
    const series = (hourly ? u.hourly : u.daily || []).map((d, i, all) => ({
      value: Number(d.total_cost) || 0,
      tick: hourly ? (i === 0 || d.hour.endsWith("T00:00") ? `${dateLabel(d.hour)} ${hourLabel(d.hour)}` : hourLabel(d.hour)) : dateLabel(d.date),
      title: `${hourly ? `${dateLabel(d.hour)} ${hourLabel(d.hour)}` : d.date}: ${money(d.total_cost)} · ${int(d.requests)} request${d.requests === 1 ? "" : "s"}`,
      last: i === all.length - 1,
    }));
    drawChart("cost_over_time", lineChart, { series, empty, yFormat: axisMoney });

    const models = (u.by_model || []).map((m) => ({
      label: m.model,
      value: Number(m.total_cost) || 0,
      text: money(m.total_cost),
      title: `${m.model} (${m.provider}): ${money(m.total_cost)} · ${int(m.requests)} requests · ${int(m.total_tokens)} tokens`,
    }));
    drawChart("cost_by_model", barChart, { rows: models, empty: empty || !models.length, xFormat: axisMoney });

    const fresh = Math.max(0, (u.input_tokens || 0) - (u.cache_read_tokens || 0) - (u.cache_write_tokens || 0));
    const slices = [
      { label: "Fresh input", value: fresh },
      { label: "Output", value: u.output_tokens || 0 },
      { label: "Cache read", value: u.cache_read_tokens || 0 },
      { label: "Cache write", value: u.cache_write_tokens || 0 },
    ];
    drawChart("tokens", donutChart, { slices, empty: empty || slices.every((s) => !s.value) });

    const days = (u.daily || []).map((d) => ({
      value: d.requests || 0,
      errors: d.errors || 0,
      tick: dateLabel(d.date),
      title: `${d.date}: ${int(d.requests)} request${d.requests === 1 ? "" : "s"}${d.errors ? ` (${int(d.errors)} failed)` : ""}`,
    }));
    drawChart("requests_per_day", columnChart, { series: days, empty });
  }

  function periodText(period) {
    if (!period) return "";
    const parts = [];
    if (period.label) parts.push(period.label);
    const span = `${period.start ? timestampLabel(period.start) : "all time"} → ${timestampLabel(period.end)}`;
    parts.push(span);
    if (period.tz) parts.push(period.tz);
    return `Period: ${parts.join(" · ")}`;
  }

  function renderCosts(c, error) {
    if (!c) {
      clearCards(["projected_month", "today_vs_yesterday"]);
      if (error) $("sub-projected_month").textContent = "unavailable";
      return;
    }
    renderCostCards(c);
  }

  function renderLatency(l, error) {
    if (!l) return chartError("latency", error);
    const rows = (l.by_provider || []).map((p) => ({
      label: p.provider,
      values: [p.latency_ms ? p.latency_ms.p50 : null, p.latency_ms ? p.latency_ms.p95 : null],
      requests: p.requests,
    }));
    const empty = !rows.length || rows.every((r) => r.values.every((v) => v === null || v === undefined));
    drawChart("latency", groupedBarChart, { rows, empty, series: ["p50", "p95"], xFormat: ms });
  }

  // ---------------------------------------------------------------- charts

  function chartBox(name) {
    return document.querySelector(`[data-chart="${name}"]`);
  }

  // Draws (or redraws on resize) one chart; `draw` returns the number of marks.
  function drawChart(name, draw, data) {
    state.charts.set(name, { draw, data });
    const box = chartBox(name);
    const width = Math.max(260, Math.floor(box.clientWidth || 600));
    box.replaceChildren();
    box.dataset.width = String(width);
    const points = data.empty ? emptyChart(box) : draw(box, width, data);
    box.dataset.rendered = "true";
    box.dataset.points = String(points);
  }

  function emptyChart(box) {
    box.append(el("div", { class: "empty", text: EMPTY_TEXT }));
    return 0;
  }

  function chartError(name, message) {
    state.charts.delete(name);
    const box = chartBox(name);
    box.replaceChildren(el("div", { class: "empty", text: `Could not load this chart${message ? `: ${message}` : ""}` }));
    delete box.dataset.rendered;
    delete box.dataset.points;
  }

  function redrawCharts() {
    for (const [name, { draw, data }] of state.charts) {
      const box = chartBox(name);
      if (Math.floor(box.clientWidth) !== Number(box.dataset.width)) drawChart(name, draw, data);
    }
  }

  function newSvg(box, width, height, label) {
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": label });
    box.append(root);
    return root;
  }

  // Round axis steps (1, 2, 2.5, 5 x 10^n) so tick labels read cleanly.
  function niceScale(max, count = 4) {
    if (!(max > 0)) return { top: 1, ticks: [0, 0.25, 0.5, 0.75, 1], step: 0.25 };
    const raw = max / count;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const norm = raw / mag;
    const step = (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 2.5 ? 2.5 : norm <= 5 ? 5 : 10) * mag;
    const n = Math.ceil(max / step - 1e-9);
    const ticks = [];
    for (let i = 0; i <= n; i++) ticks.push(i * step);
    return { top: n * step, ticks, step };
  }

  // As many decimals as the tick step needs ($0.025 steps -> 3 decimals).
  function stepDecimals(step) {
    for (let d = 0; d < 10; d++) {
      const scaled = step * 10 ** d;
      if (Math.abs(scaled - Math.round(scaled)) < 1e-6 * Math.max(1, scaled)) return d;
    }
    return 10;
  }

  function axisMoney(v, step) {
    if (v === 0) return "$0";
    const d = stepDecimals(step || v);
    return `$${v.toLocaleString("en-US", { minimumFractionDigits: d, maximumFractionDigits: d })}`;
  }

  function axisCount(v) {
    return compact(v);
  }

  function textWidth(str, size = 11) {
    return str.length * size * 0.6;
  }

  // Y gridlines + labels for a vertical chart; returns the y() scale.
  function yAxis(root, scale, left, right, top, bottom, fmt) {
    const y = (v) => bottom - (v / scale.top) * (bottom - top);
    for (const t of scale.ticks) {
      const yy = y(t);
      svg("line", { x1: left, x2: right, y1: yy, y2: yy, class: t === 0 ? "axis" : "gridline" }, root);
      svgText(root, left - 6, yy + 4, fmt(t, scale.step), { "text-anchor": "end" });
    }
    return y;
  }

  // Picks which x labels to print so they never overlap.
  function xTicks(root, points, xOf, bottom, plotWidth) {
    const widest = Math.max(...points.map((p) => textWidth(p.tick))) + 12;
    const every = Math.max(1, Math.ceil(points.length / Math.max(1, Math.floor(plotWidth / widest))));
    points.forEach((p, i) => {
      if (i % every !== 0) return;
      svgText(root, xOf(i), bottom + 16, p.tick, { "text-anchor": "middle" });
    });
  }

  function leftMargin(scale, fmt) {
    return Math.ceil(Math.max(...scale.ticks.map((t) => textWidth(fmt(t, scale.step))))) + 14;
  }

  function lineChart(box, width, { series, yFormat }) {
    const height = 240;
    const scale = niceScale(Math.max(...series.map((p) => p.value)));
    const left = leftMargin(scale, yFormat);
    const right = width - 14;
    const top = 12;
    const bottom = height - 28;
    const root = newSvg(box, width, height, `Cost over time, ${series.length} points, total ${money(series.reduce((s, p) => s + p.value, 0))}`);
    const y = yAxis(root, scale, left, right, top, bottom, yFormat);
    const n = series.length;
    // Inset the first and last points so their date labels are not cut at the edges.
    const pad = Math.min(28, Math.max(...series.map((p) => textWidth(p.tick))) / 2);
    const x0 = left + pad;
    const x1 = right - pad;
    const xOf = (i) => (n === 1 ? (x0 + x1) / 2 : x0 + (i * (x1 - x0)) / (n - 1));
    xTicks(root, series, xOf, bottom, x1 - x0);
    const pts = series.map((p, i) => `${xOf(i).toFixed(1)},${y(p.value).toFixed(1)}`);
    if (n > 1) {
      svg("path", { d: `M${xOf(0).toFixed(1)},${bottom} L${pts.join(" L")} L${xOf(n - 1).toFixed(1)},${bottom} Z`, class: "area" }, root);
      svg("path", { d: `M${pts.join(" L")}`, class: "line" }, root);
    }
    const r = n > 60 ? 2.2 : 3.5;
    series.forEach((p, i) => {
      const dot = svg("circle", { cx: xOf(i).toFixed(1), cy: y(p.value).toFixed(1), r, class: "dot mark" }, root);
      tooltip(dot, p.title);
    });
    return n;
  }

  // Vertical bars with the failed share stacked on top in red (requests per day).
  function columnChart(box, width, { series }) {
    const height = 220;
    const scale = niceScale(Math.max(...series.map((p) => p.value)));
    const left = leftMargin(scale, axisCount);
    const right = width - 10;
    const top = 12;
    const bottom = height - 28;
    const root = newSvg(box, width, height, `Requests per day, ${series.length} days, ${int(series.reduce((s, p) => s + p.value, 0))} requests`);
    const y = yAxis(root, scale, left, right, top, bottom, axisCount);
    const slot = (right - left) / series.length;
    const barW = Math.max(1, Math.min(36, slot * 0.72));
    const xOf = (i) => left + slot * (i + 0.5);
    xTicks(root, series, xOf, bottom, right - left);
    series.forEach((p, i) => {
      const g = svg("g", { class: "mark" }, root);
      tooltip(g, p.title);
      const x = xOf(i) - barW / 2;
      const ok = p.value - p.errors;
      svg("rect", { x: x.toFixed(1), y: y(p.value).toFixed(1), width: barW.toFixed(1), height: (bottom - y(p.value)).toFixed(1), class: "bar err" }, g);
      svg("rect", { x: x.toFixed(1), y: y(ok).toFixed(1), width: barW.toFixed(1), height: (bottom - y(ok)).toFixed(1), class: "bar" }, g);
      // An invisible full-height hit area so small bars still show their tooltip.
      svg("rect", { x: (xOf(i) - slot / 2).toFixed(1), y: top, width: slot.toFixed(1), height: bottom - top, fill: "transparent" }, g);
    });
    return series.length;
  }

  const MAX_BARS = 12;

  // Horizontal bars, one per row (cost per model); the tail beyond MAX_BARS is summed.
  function barChart(box, width, { rows, xFormat }) {
    let shown = rows.slice().sort((a, b) => b.value - a.value);
    if (shown.length > MAX_BARS) {
      const rest = shown.slice(MAX_BARS - 1);
      const sum = rest.reduce((s, r) => s + r.value, 0);
      shown = shown.slice(0, MAX_BARS - 1);
      shown.push({ label: `${rest.length} other models`, value: sum, text: money(sum), title: `${rest.length} other models: ${money(sum)}` });
    }
    const rowH = 28;
    const top = 6;
    const labelW = Math.min(Math.max(...shown.map((r) => textWidth(r.label, 12))) + 12, width * 0.38);
    const left = labelW;
    const valueW = Math.max(...shown.map((r) => textWidth(r.text, 11))) + 10;
    const right = width - valueW;
    const bottom = top + shown.length * rowH;
    const height = bottom + 24;
    const scale = niceScale(Math.max(...shown.map((r) => r.value)), Math.max(2, Math.min(4, Math.floor((right - left) / 70))));
    const root = newSvg(box, width, height, `Cost per model, ${shown.length} bars`);
    const x = (v) => left + (v / scale.top) * (right - left);
    for (const t of scale.ticks) {
      svg("line", { x1: x(t), x2: x(t), y1: top, y2: bottom, class: t === 0 ? "axis" : "gridline" }, root);
      svgText(root, x(t), bottom + 16, xFormat(t, scale.step), { "text-anchor": "middle" });
    }
    shown.forEach((r, i) => {
      const yy = top + i * rowH;
      const g = svg("g", { class: "mark" }, root);
      tooltip(g, r.title);
      const label = r.label.length * 7.2 > labelW - 8 ? `${r.label.slice(0, Math.max(4, Math.floor((labelW - 8) / 7.2) - 1))}…` : r.label;
      svgText(g, left - 8, yy + rowH / 2 + 4, label, { "text-anchor": "end", class: "bar-label" });
      const w = Math.max(r.value > 0 ? 2 : 0, x(r.value) - left);
      svg("rect", { x: left, y: yy + 5, width: w.toFixed(1), height: rowH - 10, rx: 3, class: "bar" }, g);
      svgText(g, left + w + 6, yy + rowH / 2 + 4, r.text);
    });
    return shown.length;
  }

  // Two bars per row (p50, p95 latency per provider).
  function groupedBarChart(box, width, { rows, series, xFormat }) {
    const rowH = 40;
    const top = 24;
    const labelW = Math.min(Math.max(...rows.map((r) => textWidth(r.label, 12))) + 12, width * 0.34);
    const left = labelW;
    const right = width - 62;
    const bottom = top + rows.length * rowH;
    const height = bottom + 24;
    const max = Math.max(...rows.flatMap((r) => r.values.filter((v) => v !== null && v !== undefined)));
    const scale = niceScale(max, Math.max(2, Math.min(4, Math.floor((right - left) / 70))));
    const root = newSvg(box, width, height, `Latency per provider, p50 and p95, ${rows.length} providers`);
    const x = (v) => left + (v / scale.top) * (right - left);
    series.forEach((name, s) => {
      const lx = left + s * 70;
      svg("rect", { x: lx, y: 4, width: 12, height: 12, rx: 2, class: `swatch${s ? " alt" : ""}` }, root);
      svgText(root, lx + 17, 14, name, { class: "legend" });
    });
    for (const t of scale.ticks) {
      svg("line", { x1: x(t), x2: x(t), y1: top, y2: bottom, class: t === 0 ? "axis" : "gridline" }, root);
      svgText(root, x(t), bottom + 16, xFormat(t), { "text-anchor": "middle" });
    }
    let marks = 0;
    rows.forEach((r, i) => {
      const yy = top + i * rowH;
      svgText(root, left - 8, yy + rowH / 2 + 4, r.label, { "text-anchor": "end", class: "bar-label" });
      r.values.forEach((v, s) => {
        if (v === null || v === undefined) return;
        const by = yy + 5 + s * 15;
        const w = Math.max(2, x(v) - left);
        const g = svg("g", { class: "mark" }, root);
        tooltip(g, `${r.label} ${series[s]}: ${ms(v)} (${int(r.requests)} requests)`);
        svg("rect", { x: left, y: by, width: w.toFixed(1), height: 13, rx: 3, class: `bar${s ? " alt" : ""}` }, g);
        svgText(g, left + w + 5, by + 10.5, ms(v));
        marks++;
      });
    });
    return marks;
  }

  function arcPath(cx, cy, rOut, rIn, a0, a1) {
    const pt = (r, a) => `${(cx + r * Math.sin(a)).toFixed(2)},${(cy - r * Math.cos(a)).toFixed(2)}`;
    const large = a1 - a0 > Math.PI ? 1 : 0;
    return `M${pt(rOut, a0)} A${rOut},${rOut} 0 ${large} 1 ${pt(rOut, a1)} L${pt(rIn, a1)} A${rIn},${rIn} 0 ${large} 0 ${pt(rIn, a0)} Z`;
  }

  // Donut with its legend to the right (below on narrow screens).
  function donutChart(box, width, { slices }) {
    const total = slices.reduce((s, x) => s + x.value, 0);
    const narrow = width < 420;
    const size = 180;
    const legendH = slices.length * 24;
    const height = narrow ? size + legendH + 20 : Math.max(size + 10, legendH);
    const root = newSvg(box, width, height, `Token distribution, ${compact(total)} tokens`);
    const cx = narrow ? width / 2 : size / 2 + 10;
    const cy = size / 2 + 4;
    const rOut = size / 2 - 2;
    const rIn = rOut * 0.6;
    let angle = 0;
    let marks = 0;
    slices.forEach((s, i) => {
      if (!s.value) return;
      // A full circle cannot be one arc: cap a lone slice just short of 360 degrees.
      const sweep = Math.min((s.value / total) * 2 * Math.PI, 2 * Math.PI - 1e-4);
      const path = svg("path", { d: arcPath(cx, cy, rOut, rIn, angle, angle + sweep), class: `slice mark c${i}` }, root);
      tooltip(path, `${s.label}: ${int(s.value)} tokens (${percent(s.value / total)})`);
      angle += sweep;
      marks++;
    });
    svgText(root, cx, cy + 2, compact(total), { "text-anchor": "middle", class: "center-big" });
    svgText(root, cx, cy + 18, "tokens", { "text-anchor": "middle" });
    const lx = narrow ? Math.max(10, width / 2 - 120) : size + 40;
    const ly = narrow ? size + 24 : Math.max(8, (height - legendH) / 2);
    slices.forEach((s, i) => {
      const yy = ly + i * 24;
      svg("rect", { x: lx, y: yy, width: 12, height: 12, rx: 2, class: `c${i}` }, root);
      const t = svgText(root, lx + 20, yy + 11, `${s.label}: `, { class: "legend" });
      const v = svg("tspan", { "font-weight": "600" }, t);
      v.textContent = `${compact(s.value)} `;
      const pc = svg("tspan", { class: "pct" }, t);
      pc.textContent = `(${total ? percent(s.value / total) : "0%"})`;
    });
    return marks;
  }

  // ---------------------------------------------------------------- tables

  function tableBox(name) {
    return document.querySelector(`[data-table="${name}"]`);
  }

  function tableMessage(name, text) {
    state.tables.delete(name);
    const box = tableBox(name);
    box.replaceChildren(el("div", { class: "empty", text }));
    box.dataset.rows = "0";
  }

  // columns: [{key, label, num, sort(row) -> comparable, cell(row) -> Node|string, header}]
  function renderTable(name, columns, rows, labelledBy) {
    const prev = state.tables.get(name);
    const t = { columns, rows, sort: prev ? prev.sort : null, labelledBy };
    state.tables.set(name, t);
    drawTable(name);
  }

  function sortedRows(t) {
    if (!t.sort) return t.rows;
    const col = t.columns.find((c) => c.key === t.sort.key);
    if (!col) return t.rows;
    const get = col.sort || ((r) => r[col.key]);
    const dir = t.sort.dir === "ascending" ? 1 : -1;
    return t.rows
      .map((r, i) => [r, i])
      .sort(([a, ia], [b, ib]) => {
        const va = get(a);
        const vb = get(b);
        const cmp = typeof va === "number" && typeof vb === "number" ? va - vb : String(va ?? "").localeCompare(String(vb ?? ""));
        return cmp * dir || ia - ib;
      })
      .map(([r]) => r);
  }

  function drawTable(name, focusKey) {
    const t = state.tables.get(name);
    const box = tableBox(name);
    // A live refresh redraws the table: keep keyboard focus where it was.
    const active = document.activeElement;
    const refocus = focusKey ? `sort:${focusKey}` : box.contains(active) ? active.dataset.focus : "";
    const table = el("table", { "aria-labelledby": t.labelledBy });
    const headRow = el("tr");
    for (const c of t.columns) {
      const th = el("th", { scope: "col", class: c.num ? "num" : null });
      if (t.sort && t.sort.key === c.key) th.setAttribute("aria-sort", t.sort.dir);
      // A real button: focusable, and Enter/Space click it natively.
      const btn = el("button", { type: "button", class: "sort", "data-key": c.key, "data-focus": `sort:${c.key}`, text: c.label });
      btn.addEventListener("click", () => toggleSort(name, c));
      th.append(btn);
      headRow.append(th);
    }
    const body = el("tbody");
    for (const r of sortedRows(t)) {
      const tr = el("tr", { class: r._class || null });
      for (const c of t.columns) {
        const cell = el(c.header ? "th" : "td", { scope: c.header ? "row" : null, class: c.num ? "num" : null });
        const content = c.cell ? c.cell(r) : r[c.key];
        cell.append(content instanceof Node ? content : String(content ?? "–"));
        tr.append(cell);
      }
      body.append(tr);
    }
    table.append(el("thead", {}, headRow), body);
    box.replaceChildren(table);
    box.dataset.rows = String(t.rows.length);
    if (refocus) {
      const target = [...box.querySelectorAll("[data-focus]")].find((n) => n.dataset.focus === refocus);
      if (target) target.focus();
    }
  }

  function toggleSort(name, col) {
    const t = state.tables.get(name);
    if (t.sort && t.sort.key === col.key) t.sort.dir = t.sort.dir === "ascending" ? "descending" : "ascending";
    else t.sort = { key: col.key, dir: col.num ? "descending" : "ascending" };
    drawTable(name, col.key);
  }

  const num = (key, label, fmt) => ({ key, label, num: true, sort: (r) => Number(r[key]) || 0, cell: (r) => (fmt || int)(r[key]) });
  const cost = (key, label) => ({ key, label, num: true, sort: (r) => Number(r[key]) || 0, cell: (r) => costChip(r[key]) });

  function renderUsers(data, error) {
    if (!data) return tableMessage("users", `Could not load users${error ? `: ${error}` : ""}`);
    updateUserChoices(data.users || []);
    if (!(data.users || []).length) return tableMessage("users", "No users in this period");
    const columns = [
      {
        key: "user",
        label: "User",
        header: true,
        cell: (r) => {
          // Clicking a name narrows the whole dashboard to that user.
          const b = el("button", { type: "button", class: "linkish truncate", "data-focus": `user:${r.user}`, title: `Show only ${r.user}`, text: r.user });
          b.addEventListener("click", () => {
            state.filters.user = r.user;
            $("f-user").value = r.user;
            filtersChanged();
          });
          return b;
        },
      },
      num("requests", "Requests"),
      num("errors", "Errors"),
      num("sessions", "Sessions"),
      num("total_tokens", "Tokens"),
      cost("total_cost", "Cost"),
    ];
    renderTable("users", columns, data.users, "h-users");
  }

  function renderSessions(data, error) {
    if (!data) return tableMessage("sessions", `Could not load sessions${error ? `: ${error}` : ""}`);
    if (!(data.sessions || []).length) {
      const without = data.requests_without_session ? ` (${int(data.requests_without_session)} requests carry no session id)` : "";
      return tableMessage("sessions", `No sessions in this period${without}`);
    }
    const columns = [
      { key: "session", label: "Session", header: true, cell: (r) => el("span", { class: "truncate", title: r.session, text: r.session }) },
      num("requests", "Requests"),
      num("total_tokens", "Tokens"),
      cost("total_cost", "Cost"),
      { key: "last_active", label: "Last active", cell: (r) => timestampLabel(r.last_active) },
    ];
    // The server already sorted by the chosen key: drop a stale client sort.
    const prev = state.tables.get("sessions");
    if (prev && prev.serverSort !== state.sessionsSort) prev.sort = null;
    renderTable("sessions", columns, data.sessions, "h-sessions");
    state.tables.get("sessions").serverSort = state.sessionsSort;
  }

  function tagsText(tags) {
    if (!tags) return "";
    if (Array.isArray(tags)) return tags.join(", ");
    if (typeof tags === "object") return Object.entries(tags).map(([k, v]) => `${k}=${v}`).join(", ");
    return String(tags);
  }

  function renderExpensive(data, error) {
    if (!data) return tableMessage("expensive_requests", `Could not load requests${error ? `: ${error}` : ""}`);
    const rows = data.requests || [];
    if (!rows.length) return tableMessage("expensive_requests", EMPTY_TEXT);
    const columns = [
      { key: "timestamp", label: "Time", header: true, cell: (r) => el("span", { title: r.request_id ? `request ${r.request_id}` : null, text: timestampLabel(r.timestamp) }) },
      { key: "provider", label: "Provider" },
      { key: "model", label: "Model", cell: (r) => el("span", { title: r.response_model && r.response_model !== r.model ? `answered by ${r.response_model}` : null, text: r.model || "–" }) },
      { key: "user_id", label: "User", cell: (r) => (r.user_id ? el("span", { class: "truncate", title: r.user_id, text: r.user_id }) : el("span", { class: "muted", text: "–" })) },
      num("input_tokens", "Input"),
      num("output_tokens", "Output"),
      num("cache_read_tokens", "Cache read"),
      cost("total_cost", "Cost"),
      {
        key: "status",
        label: "Status",
        num: true,
        sort: (r) => Number(r.status) || 0,
        cell: (r) => el("span", { class: Number(r.status) >= 400 || r.status === "error" ? "status-err" : "status-ok", text: String(r.status ?? "–") }),
      },
      { key: "tags", label: "Tags", sort: (r) => tagsText(r.tags), cell: (r) => el("span", { class: "truncate muted", title: tagsText(r.tags) || null, text: tagsText(r.tags) || "–" }) },
    ];
    renderTable("expensive_requests", columns, rows, "h-expensive");
  }

  function budgetClass(b, warnAt) {
    const used = Number(b.used_fraction) || 0;
    if (used >= 1 || b.status === "exceeded") return "budget-over";
    if (used >= warnAt || b.status === "warning") return "budget-warn";
    return "budget-ok";
  }

  function meter(b) {
    const used = Number(b.used_fraction) || 0;
    const fill = el("span", { class: "meter-fill" });
    fill.style.width = `${Math.min(100, Math.max(0, used * 100)).toFixed(1)}%`;
    return el(
      "span",
      { class: "meter", role: "meter", "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": (used * 100).toFixed(1), "aria-label": `${b.name}: ${percent(used)} used` },
      el("span", { class: "meter-track" }, fill),
      el("span", { class: "meter-text", text: percent(used, 0) }),
    );
  }

  function renderBudgets(data, error) {
    const isUser = state.who && state.who.role === "user";
    if (!data) {
      if (isUser && error && error.status === 403) return tableMessage("budgets", "Budgets are visible to administrators only.");
      return tableMessage("budgets", `Could not load budgets${error ? `: ${error.message}` : ""}`);
    }
    const warnAt = Number(data.warn_at) || 0.8;
    const rows = (data.budgets || []).map((b) => ({ ...b, _class: budgetClass(b, warnAt) }));
    if (!rows.length) return tableMessage("budgets", "No budgets configured.");
    const columns = [
      { key: "name", label: "Budget", header: true },
      { key: "scope", label: "Scope", cell: (r) => (r.value && r.value !== "*" ? `${r.scope}: ${r.value}` : r.scope || "–") },
      { key: "period", label: "Period" },
      { key: "used_fraction", label: "Used", num: true, sort: (r) => Number(r.used_fraction) || 0, cell: meter },
      // Not a per-request chip: a budget's spend is judged by its share used (the row's colour).
      { key: "spent", label: "Spent", num: true, sort: (r) => Number(r.spent) || 0, cell: (r) => money(r.spent) },
      { key: "limit", label: "Limit", num: true, sort: (r) => Number(r.limit) || 0, cell: (r) => money(r.limit) },
      { key: "remaining", label: "Remaining", num: true, sort: (r) => Number(r.remaining) || 0, cell: (r) => money(r.remaining) },
      { key: "status", label: "Status", cell: (r) => el("span", { class: "badge", text: r.status || "–" }) },
      { key: "resets_at", label: "Resets", cell: (r) => (r.resets_at ? timestampLabel(r.resets_at) : "–") },
    ];
    renderTable("budgets", columns, rows, "h-budgets");
  }

  // ---------------------------------------------------------------- export

  function filenameFrom(disposition) {
    if (!disposition) return "";
    let name = "";
    const star = /filename\*\s*=\s*(?:[\w-]+'[^']*')?("?)([^";]+)\1/i.exec(disposition);
    if (star) {
      try {
        name = decodeURIComponent(star[2]);
      } catch {
        name = star[2];
      }
    } else {
      const plain = /filename\s*=\s*(?:"([^"]*)"|([^;]+))/i.exec(disposition);
      if (plain) name = (plain[1] ?? plain[2]).trim();
    }
    // Only a base name: never let the server pick a directory.
    return name.replace(/[/\\]/g, "_").replace(/^\.+/, "");
  }

  async function exportCsv() {
    const btn = $("export-csv");
    btn.disabled = true;
    btn.textContent = "Exporting…";
    try {
      const p = new URLSearchParams([["format", "csv"], ...filterParams()]);
      // fetch, not a plain link: a plain link could not send the Authorization header.
      const res = await request("/api/analytics/export", p, undefined, "text/csv");
      const blob = await res.blob();
      const a = el("a", { href: URL.createObjectURL(blob), download: filenameFrom(res.headers.get("Content-Disposition")) || "llm-cost-export.csv" });
      a.hidden = true;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 60000);
    } catch (e) {
      if (e.status === 401) showLogin("The proxy key is no longer accepted.");
      else showError(`Export: ${e.message}`);
    } finally {
      btn.disabled = false;
      btn.textContent = "Export CSV";
    }
  }

  // ---------------------------------------------------------------- live updates

  function setLive(mode, detail) {
    const node = $("live");
    const text = { connecting: "connecting", live: "live", polling: "polling", offline: "offline" }[mode] || mode;
    node.dataset.state = mode;
    node.textContent = text;
    node.title = detail || {
      connecting: "Connecting to the live event stream",
      live: "Live: refreshes as soon as a request is logged",
      polling: "Live stream unavailable: refreshing every 10 seconds",
      offline: "Not updating",
    }[mode];
  }

  function stopLive() {
    const l = state.live;
    if (l.ctrl) l.ctrl.abort();
    l.ctrl = null;
    clearTimeout(l.retry);
    clearTimeout(l.watchdog);
    stopPolling();
  }

  function startPolling() {
    if (state.live.poll) return;
    state.live.poll = setInterval(() => {
      if (!state.load) runLoad();
    }, POLL_MS);
  }

  function stopPolling() {
    clearInterval(state.live.poll);
    state.live.poll = 0;
  }

  // Parses one SSE block ("event: record\ndata: {...}"); comments (": ping") carry nothing.
  function handleSseBlock(block) {
    let event = "message";
    for (const line of block.split(/\r?\n|\r/)) {
      if (!line || line.startsWith(":")) continue;
      const i = line.indexOf(":");
      const field = i < 0 ? line : line.slice(0, i);
      const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
      if (field === "event") event = value;
    }
    if (event === "record") scheduleRefresh();
  }

  // fetch() streaming rather than EventSource, because EventSource cannot send headers.
  async function startLive() {
    stopLive();
    const l = state.live;
    const ctrl = new AbortController();
    l.ctrl = ctrl;
    const resetWatchdog = () => {
      clearTimeout(l.watchdog);
      l.watchdog = setTimeout(() => ctrl.abort(), STREAM_SILENCE_MS);
    };
    let reason = "the stream ended";
    try {
      setLive("connecting");
      resetWatchdog();
      const res = await fetch("/api/events", { headers: authHeaders({ Accept: "text/event-stream" }), signal: ctrl.signal, cache: "no-store" });
      if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
      const wasPolling = Boolean(l.poll);
      stopPolling();
      setLive("live");
      if (wasPolling) scheduleRefresh(); // catch up on what happened while polling
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        resetWatchdog();
        buffer += decoder.decode(value, { stream: true });
        const blocks = buffer.split(/\r?\n\r?\n/);
        buffer = blocks.pop();
        blocks.forEach(handleSseBlock);
      }
    } catch (e) {
      reason = e.name === "AbortError" ? "no data from the stream" : e.message;
    }
    clearTimeout(l.watchdog);
    if (l.ctrl !== ctrl) return; // stopped on purpose (sign-out, restart)
    l.ctrl = null;
    setLive("polling", `Live stream unavailable (${reason}): refreshing every 10 seconds`);
    startPolling();
    l.retry = setTimeout(startLive, STREAM_RETRY_MS);
  }

  // ---------------------------------------------------------------- start

  function bind() {
    $("f-range").addEventListener("change", onRangeChange);
    $("f-start").addEventListener("change", onDateChange);
    $("f-end").addEventListener("change", onDateChange);
    $("f-provider").addEventListener("change", () => onSelectChange("provider"));
    $("f-model").addEventListener("change", () => onSelectChange("model"));
    $("f-user").addEventListener("change", onTextChange);
    $("f-tag").addEventListener("change", onTextChange);
    $("filters").addEventListener("submit", (e) => {
      e.preventDefault(); // Enter in a text field applies it
      onTextChange();
    });
    $("f-reset").addEventListener("click", onReset);
    $("export-csv").addEventListener("click", exportCsv);
    $("sessions-sort").addEventListener("change", () => {
      state.sessionsSort = $("sessions-sort").value;
      writeUrl();
      loadSessionsOnly();
    });
    $("key-form").addEventListener("submit", onKeySubmit);
    $("sign-out").addEventListener("click", onSignOut);
    $("error-close").addEventListener("click", hideError);
    let frame = 0;
    const onResize = () => {
      cancelAnimationFrame(frame);
      frame = requestAnimationFrame(redrawCharts);
    };
    if (window.ResizeObserver) new ResizeObserver(onResize).observe(document.querySelector(".charts"));
    else window.addEventListener("resize", onResize);
  }

  function showLoading() {
    for (const box of document.querySelectorAll("[data-chart], [data-table]")) {
      box.replaceChildren(el("div", { class: "empty", text: "Loading…" }));
      for (const k of ["rendered", "points", "rows", "width"]) delete box.dataset[k];
    }
  }

  function start() {
    state.filters = filtersFromUrl();
    filtersToInputs();
    bind();
    showLoading();
    signIn();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
