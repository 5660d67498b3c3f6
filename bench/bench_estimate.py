"""How close are estimated token counts on real text?

Compares, on real files found on this machine (English licence prose, Python source,
Markdown docs), the two estimators the proxy uses when a reply has no usage:
- the o200k BPE from bpe-openai (exact for OpenAI's current models' text tokens),
- the character heuristic used when that package is not installed,
against the o200k count as the reference. Run: python bench/bench_estimate.py
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from proxy.core.estimate import count_tokens, heuristic_tokens, tokenizer_name  # noqa: E402

CHUNK = 4000  # characters: about one long chat message


def samples() -> dict[str, list[str]]:
    stdlib = sysconfig.get_paths()["stdlib"]
    groups = {
        "English prose (licences)": sorted(glob.glob("/usr/share/common-licenses/*"))[:8],
        "Python source (stdlib)": sorted(glob.glob(os.path.join(stdlib, "*.py")))[:40],
        "Markdown (READMEs)": sorted(glob.glob("/usr/share/doc/*/README*.md"))[:20]
        + sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "*.md"))),
    }
    out: dict[str, list[str]] = {}
    for name, files in groups.items():
        chunks: list[str] = []
        for f in files:
            try:
                text = open(f, encoding="utf-8").read()
            except (OSError, UnicodeDecodeError):
                continue
            chunks += [text[i : i + CHUNK] for i in range(0, len(text), CHUNK) if len(text[i : i + CHUNK]) > 200]
        if chunks:
            out[name] = chunks[:200]
    return out


def main() -> int:
    if tokenizer_name() != "bpe-openai":
        print("bpe-openai is not installed: pip install bpe-openai (the reference count needs it)")
        return 1
    print(f"{'text':<28}{'chunks':>8}{'o200k tokens':>14}{'heuristic':>12}{'error':>9}{'worst chunk':>13}")
    for name, chunks in samples().items():
        ref = [count_tokens(c, "gpt-4o") for c in chunks]
        heu = [heuristic_tokens(c) for c in chunks]
        total_ref, total_heu = sum(ref), sum(heu)
        worst = max(abs(h - r) / r for h, r in zip(heu, ref) if r)
        print(f"{name:<28}{len(chunks):>8}{total_ref:>14}{total_heu:>12}{(total_heu - total_ref) / total_ref:>+9.1%}{worst:>13.1%}")
    text = "".join(samples()["English prose (licences)"])
    t = time.perf_counter()
    count_tokens(text, "gpt-4o")
    dt = time.perf_counter() - t
    print(f"\nBPE speed: {len(text) / dt / 1e6:.1f} M characters/s (counting runs only for calls without usage)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
