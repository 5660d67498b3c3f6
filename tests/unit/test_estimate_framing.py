"""The input estimate of a Chat Completions prompt is OpenAI's own count.

The expected numbers follow OpenAI's cookbook (``num_tokens_from_messages``): 3 tokens per
message, every value of the message encoded on its own, 1 more for a ``name``, 3 priming
the reply. They are computed here with the o200k vocabulary straight from bpe_openai,
not from proxy code.
"""

from __future__ import annotations

import bpe_openai
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.estimate import estimate_input_tokens

O200K = bpe_openai.get_encoding("o200k_base")


def enc(text: str) -> int:
    return len(O200K.encode(text, disallowed_special=()))


def openai_count(messages: list[dict[str, str]]) -> int:
    n = 3  # the reply's primer
    for m in messages:
        n += 3
        for key, value in m.items():
            n += enc(value)
            if key == "name":
                n += 1
    return n


def test_a_prompt_openai_counts_as_1000_is_estimated_as_1000() -> None:
    words = ("cost", "proxy", "token", "budget", "stream", "cache", "price", "report")
    body = ""
    messages: list[dict[str, str]] = []
    i = 0
    # Grow the user's text a word at a time until OpenAI's count reaches 1,000 exactly.
    while True:
        messages = [
            {"role": "system", "content": "You are a careful accountant."},
            {"role": "user", "name": "alice", "content": body},
        ]
        if openai_count(messages) >= 1000:
            break
        body += f" {words[i % len(words)]}"
        i += 1
    if openai_count(messages) > 1000:  # a word of two tokens overshot: try a one-token word
        body = body.rsplit(" ", 1)[0] + " a"
        messages[1]["content"] = body
    assert openai_count(messages) == 1000
    assert estimate_input_tokens({"model": "gpt-4o", "messages": messages, "stream": True}, "gpt-4o") == 1000


roles = st.sampled_from(["system", "user", "assistant", "developer"])
texts = st.text(st.characters(codec="utf-8"), max_size=200)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(roles, texts, st.none() | st.from_regex(r"[a-z_]{1,12}", fullmatch=True)), min_size=1, max_size=6))
def test_any_text_chat_prompt_is_estimated_as_openai_counts_it(spec: list[tuple[str, str, str | None]]) -> None:
    messages = [{"role": r, "content": c, **({"name": n} if n else {})} for r, c, n in spec]
    assert estimate_input_tokens({"model": "gpt-4o-mini", "messages": messages}, "gpt-4o-mini") == openai_count(messages)
