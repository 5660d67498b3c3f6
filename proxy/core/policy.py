"""Metering policy: which usage a finished call bills (``billed_usage``: the reply's,
or an estimate when it never came), the most a call can cost before it is made (its
worst case), reserved against budgets, and why a call with no price is refused under one.

Pure; see docs/budgets.md ("What a call reserves") and docs/providers.md for the
request fields each family reads as output caps and choice counts.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

from proxy.core.usage import CallInfo, Usage

# Every spelling of an output cap a provider accepts. Providers differ in which they
# honour when several are sent (and OpenAI-compatible servers differ again), so the
# largest one present is the cap.
_MAX_OUT_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


_GEN_CONFIG_KEYS = ("generationConfig", "generation_config")


_GEN_MAX_OUT_KEYS = ("maxOutputTokens", "max_output_tokens")


# Choices billed per call: OpenAI ``n`` (and legacy completions' ``best_of``, which
# generates that many server-side and bills them all), Gemini candidate counts.
_CHOICE_KEYS = ("n", "best_of")


_GEN_CHOICE_KEYS = ("candidateCount", "candidate_count")


_MAX_CHOICES = 128


# No provider accepts a count this large; bounding the digits also keeps int() of a
# client's megabyte-long digit string off the event loop.
_MAX_DIGITS = 18


_MAX_COUNT = 10**_MAX_DIGITS


def _count(v: object) -> int | None:
    """A non-negative whole number in any form a provider parses as one, else None:
    a provider rejects anything else, so it is not a cap to honour."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if 0 <= v < _MAX_COUNT else None
    if isinstance(v, float):
        return int(v) if math.isfinite(v) and 0 <= v < _MAX_COUNT and v.is_integer() else None
    if isinstance(v, str):
        # Gemini's JSON (proto3) takes integers as strings, and lenient servers take
        # "1000.0"; str.isdigit alone would also pass non-ASCII digits such as "²".
        whole, dot, frac = v.strip().removeprefix("+").partition(".")
        if whole.isascii() and whole.isdigit() and len(whole) <= _MAX_DIGITS and (not dot or frac.strip("0") == ""):
            return int(whole)
    return None


def _largest(values: Iterable[object], minimum: int = 0) -> int | None:
    found = [c for v in values if (c := _count(v)) is not None and c >= minimum]
    return max(found) if found else None


def max_output_tokens(body: object, kind: str | None, default: int) -> int:
    """The most output a request can produce: its own cap or ``default`` (per choice),
    times the number of choices asked for (at most 128). Caps: ``max_tokens``,
    ``max_completion_tokens``, ``max_output_tokens`` (Responses) at the top level, and
    ``maxOutputTokens`` / ``max_output_tokens`` in Gemini's ``generationConfig`` /
    ``generation_config``; choices: ``n``, ``best_of``, ``candidateCount`` /
    ``candidate_count``. Ints, integral floats and numeric strings count; the largest
    of several spellings wins; negative or non-numeric values are ignored."""
    if kind == "embeddings":
        return 0
    if not isinstance(body, dict):
        return default
    caps = [body.get(k) for k in _MAX_OUT_KEYS]
    choices = [body.get(k) for k in _CHOICE_KEYS]
    for gk in _GEN_CONFIG_KEYS:
        gen = body.get(gk)
        if isinstance(gen, dict):
            caps += [gen.get(k) for k in _GEN_MAX_OUT_KEYS]
            choices += [gen.get(k) for k in _GEN_CHOICE_KEYS]
    cap = _largest(caps)
    # n=0 is rejected upstream; it must not make the reservation $0.
    n = _largest(choices, minimum=1) or 1
    return (default if cap is None else cap) * min(n, _MAX_CHOICES)


def worst_case_usage(
    body: object,
    raw: bytes,
    kind: str | None,
    input_tokens: int,
    default_max_output: int,
    model_max_output: int | None = None,
) -> Usage:
    """A Usage for the most this request can cost: the estimated input, billed as a
    cache write when the request asks for caching (dearer than plain input on
    Anthropic), and the full output cap. A request without a cap may produce the
    model's maximum output per choice, ``model_max_output`` (``model_output_limit``),
    else ``default_max_output``."""
    per_choice = default_max_output if model_max_output is None else model_max_output
    u = Usage(input_tokens=input_tokens, output_tokens=max_output_tokens(body, kind, per_choice))
    if b"cache_control" in raw:
        u.cache_write_tokens = input_tokens
        if b'"1h"' in raw:
            u.cache_write_1h_tokens = input_tokens
    return u


def unpriced_refusal_message(provider: str, model: str | None) -> str:
    """Why a call under a budget is refused when its model has no price, and the three
    ways out. A model with no price would reserve and add $0: unseen spend."""
    if model:
        what = f"Model {model!r} on provider {provider!r} has no price"
        where = f"providers.{provider}.models.{model}.pricing"
    else:
        what = f"This call to provider {provider!r} names no model, so it has no price"
        where = f"providers.{provider}.models.<model>.pricing"
    return (
        f"{what}, so its cost cannot be counted against the budgets that apply to it. "
        f"To allow it, give the model a price: {where} in config.yml "
        "(e.g. {input: 2.50, output: 10.00}, USD per 1M tokens), "
        "or turn the bundled price catalog on (catalog: {enabled: true}) if it is off and lists this model, "
        "or set budgets.allow_unpriced: true to let calls to unpriced models through (their cost is not counted)."
    )


def billed_usage(
    info: CallInfo,
    *,
    model: str | None,
    status: int,
    metered: bool,
    error: str | None,
    input_tokens: Callable[[str | None], int] | None,
) -> tuple[Usage | None, str | None]:
    """The usage a finished call bills and where it came from ("provider", "estimated",
    None): the reply's; or, when it never came, an estimate from the request
    (``input_tokens`` for a model; None when the body was not read) and the text relayed
    so far, since the provider bills a call it accepted either way (docs/providers.md
    §10). ``model`` is the requested one, used when the reply named none."""
    usage, text = info.usage, info.output_text
    if info.usage_error:
        return None, None  # the reply reported usage we cannot believe: cost unknown
    accepted = 200 <= status < 400 or status == 499
    if not (metered and accepted):
        return usage, "provider" if usage is not None else None
    if usage is None:
        if input_tokens is None:
            return None, None
        model = info.response_model or model
        output = text.tokens() if text is not None else 0
        return Usage(input_tokens=input_tokens(model), output_tokens=output), "estimated"
    if error and text is not None and not text.empty and info.finish_reason is None:
        # Cut short after usage began (Anthropic's message_start has only a
        # placeholder output count): the relayed text is the better output figure.
        relayed = text.tokens()
        if relayed > usage.output_tokens:
            usage.output_tokens = relayed
            return usage, "estimated"
    return usage, "provider"
