"""The ``rules`` backend: a deterministic explanation from the strongest correlations and the
metric ranges of the top-activating steps. Always available, so every latent gets something.

It also yields machine-readable conditions, which is how its explanations are scored."""

from __future__ import annotations

from typing import Any

import numpy as np

from explainer.context import LatentContext

__all__ = ["explain_rules", "explain_tokens", "conditions_from_text"]

MIN_ABS_R = 0.2


def explain_tokens(ctx: LatentContext, *, max_tokens: int = 4) -> dict[str, Any] | None:
    """A language-model latent: the tokens it fires on most, as a ``tokens`` condition."""
    seen: dict[str, int] = {}
    for e in ctx.top:
        if e.get("token"):
            seen[e["token"]] = seen.get(e["token"], 0) + 1
    if not seen:
        return None
    toks = sorted(seen, key=lambda t: -seen[t])[:max_tokens]
    shown = ", ".join(repr(t) for t in toks)
    contexts = "; ".join(repr(e["context"]) for e in ctx.top[:2] if e.get("context"))
    return {
        "label": f"fires on {shown}",
        "text": f"Its top activations are on the tokens {shown}, e.g. {contexts}.",
        "conditions": [{"tokens": toks}],
    }


def explain_rules(ctx: LatentContext, *, max_terms: int = 2) -> dict[str, Any]:
    if ctx.tokens:
        out = explain_tokens(ctx)
        if out is not None:
            return out
    strong = sorted(((m, r) for m, r in ctx.corr.items() if r is not None and abs(r) >= MIN_ABS_R), key=lambda mr: -abs(mr[1]))
    strong = strong[:max_terms]
    if not strong:
        return {
            "label": "no clear link to any metric",
            "text": f"No metric correlates with it beyond |r| = {MIN_ABS_R}.",
            "conditions": [],
        }
    terms, conditions, ranges = [], [], []
    active = ctx.quantiles[-2:] or ctx.top  # the top two activation deciles: what "it fires" looks like
    for m, r in strong:
        top_vals = [e["metrics"][m] for e in active if e["metrics"].get(m) is not None]
        all_vals = [e["metrics"][m] for e in ctx.quantiles if e["metrics"].get(m) is not None]
        if not top_vals or not all_vals:
            continue
        top_mean, typical = float(np.mean(top_vals)), float(np.median(all_vals))
        thr = (top_mean + typical) / 2
        high = r > 0
        terms.append(f"{m} is {'high' if high else 'low'} (r={r:+.2f})")
        conditions.append({"metric": m, "op": ">" if high else "<", "value": round(thr, 6)})
        ranges.append(f"{m} ≈ {top_mean:+.3f} when it fires vs {typical:+.3f} typically")
    label = " and ".join(f"{'high' if c['op'] == '>' else 'low'} {c['metric']}" for c in conditions)
    return {"label": label, "text": f"Fires when {' and '.join(terms)}; " + "; ".join(ranges) + ".", "conditions": conditions}


_UP = ("high", "large", "big", "positive", "increas", "above", "right", "fast", "rise", "rising")
_DOWN = ("low", "small", "negative", "decreas", "below", "left", "slow", "fall", "falling")


def conditions_from_text(text: str, ctx: LatentContext) -> list[dict[str, Any]]:
    """Conditions on the metrics a free-text explanation names, so it can be scored like the
    rules backend's: the direction comes from words near the name, else the correlation's sign;
    the threshold from the context, as for the rules backend."""
    low = text.lower()
    out: list[dict[str, Any]] = []
    if ctx.tokens:
        named = sorted(
            {e["token"] for e in ctx.top if e.get("token") and len(e["token"].strip()) > 1 and e["token"].strip().lower() in low}
        )
        if named:
            return [{"tokens": named}]
    active = ctx.quantiles[-2:] or ctx.top
    for m in ctx.metrics:
        at = low.find(m.lower())
        if at < 0:
            continue
        near = low[max(0, at - 40) : at + len(m) + 40]
        up, down = any(w in near for w in _UP), any(w in near for w in _DOWN)
        r = ctx.corr.get(m) or 0.0
        high = up if up != down else r >= 0
        vals = [e["metrics"][m] for e in active if e["metrics"].get(m) is not None]
        typical = [e["metrics"][m] for e in ctx.quantiles if e["metrics"].get(m) is not None]
        if vals and typical:
            thr = (float(np.mean(vals)) + float(np.median(typical))) / 2
            out.append({"metric": m, "op": ">" if high else "<", "value": round(thr, 6)})
    return out[:2]
