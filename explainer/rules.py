"""The ``rules`` backend: a deterministic explanation, for machines with no LLM.

Each metric that tells the prompt's active steps from its quiet ones (|r| >= ``MIN_ABS_R`` with "it activates",
or its magnitude does, for a latent that fires on both sides of zero) is a candidate condition, its
threshold the one that best separates the prompt's active steps from its quiet ones. Terms are
then added greedily, best first, on the VALIDATE episodes (never the TEST ones the score uses),
and only while each raises the balanced accuracy there by ``MIN_GAIN`` (the first must reach
``MIN_FIRST``): a second metric that does not help is left out, and noise gets no claim."""

from __future__ import annotations

from typing import Any

import numpy as np

from explainer.conditions import describe, predict
from explainer.context import EXPLAIN, VALIDATE, LatentContext

__all__ = ["explain_rules", "explain_tokens", "token_conditions", "balanced_accuracy", "best_condition", "MIN_ABS_R"]

MIN_ABS_R = 0.2
MIN_GAIN = 0.01
MIN_FIRST = 0.6  # validation balanced accuracy a first term needs: chance is 0.5
NO_LINK = "no clear link to any metric"


def balanced_accuracy(pred: np.ndarray, active: np.ndarray, quiet: np.ndarray) -> float:
    """Over the rows that are clearly active or clearly quiet; NaN without both."""
    if not active.any() or not quiet.any():
        return float("nan")
    return float((pred[active].mean() + (~pred[quiet]).mean()) / 2)


def best_condition(col: np.ndarray, active: np.ndarray, quiet: np.ndarray, op: str, metric: str) -> tuple[dict[str, Any], float]:
    """The threshold (among the column's 5th..95th percentiles) that best separates active from quiet."""
    best: tuple[dict[str, Any], float] = ({"metric": metric, "op": op, "value": 0.0}, -1.0)
    for v in np.unique(np.quantile(col, np.linspace(0.05, 0.95, 19))):
        c = {"metric": metric, "op": op, "value": round(float(v), 6)}
        pred = col > v if op.endswith(">") else col < v
        ba = balanced_accuracy(pred, active, quiet)
        if ba > best[1]:
            best = (c, ba)
    return best


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


def token_conditions(text: str, ctx: LatentContext) -> list[dict[str, Any]]:
    """The top-activating tokens a free-text explanation of a language-model latent names."""
    low = text.lower()
    named = sorted(
        {e["token"] for e in ctx.top if e.get("token") and len(e["token"].strip()) > 1 and e["token"].strip().lower() in low}
    )
    return [{"tokens": named}] if named else []


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) < 1e-12 or np.std(b) < 1e-12:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _candidates(ctx: LatentContext) -> list[tuple[dict[str, Any], float]]:
    """(condition, r) per metric that tells active steps from quiet ones, strongest first; r is
    the correlation of the metric (or its magnitude) with "it activates" on the EXPLAIN rows
    that clearly do or do not (so a rare but sharp latent is not drowned by its silent steps)."""
    s = ctx.steps
    assert s is not None
    lo, hi = s.levels()
    rows = s.rows(EXPLAIN)
    act, met = s.act[rows], s.metrics[rows]
    active, quiet = act >= hi, act <= lo
    keep = active | quiet
    fires = active[keep].astype(np.float64)
    out = []
    for j, m in enumerate(ctx.metrics):
        col = met[:, j]
        r, r_abs = _corr(fires, col[keep]), _corr(fires, np.abs(col[keep]))
        if max(abs(r), abs(r_abs)) < MIN_ABS_R:
            continue
        if abs(r_abs) > abs(r) + 0.1 and np.min(col) < 0 < np.max(col):  # fires on both sides of zero
            c, _ = best_condition(np.abs(col), active, quiet, "abs>" if r_abs > 0 else "abs<", m)
            out.append((c, r_abs))
        else:
            c, _ = best_condition(col, active, quiet, ">" if r > 0 else "<", m)
            out.append((c, r))
    return sorted(out, key=lambda cr: -abs(cr[1]))


def _text(terms: list[tuple[dict[str, Any], float]]) -> dict[str, Any]:
    conditions = [c for c, _ in terms]
    label = " and ".join(
        f"{'high' if c['op'].endswith('>') else 'low'} " + (f"|{c['metric']}|" if c["op"].startswith("abs") else c["metric"])
        for c in conditions
    )
    said = " and ".join(f"{describe(c)} (r={r:+.2f})" for c, r in terms)
    return {"label": label, "text": f"Fires when {said}.", "conditions": conditions}


def explain_rules(ctx: LatentContext, *, max_terms: int = 3, min_gain: float = MIN_GAIN) -> dict[str, Any]:
    if ctx.tokens:
        out = explain_tokens(ctx)
        if out is not None:
            return out
    none = {"label": NO_LINK, "text": f"No metric correlates with it beyond |r| = {MIN_ABS_R}.", "conditions": []}
    if ctx.steps is None:  # no recent steps to fit or validate on: the strongest correlation alone
        strong = max(((m, r) for m, r in ctx.corr.items() if r is not None), key=lambda mr: abs(mr[1]), default=None)
        if strong is None or abs(strong[1]) < MIN_ABS_R:
            return none
        m, r = strong
        vals = [e["metrics"][m] for e in (ctx.quantiles[-2:] or ctx.top) if e["metrics"].get(m) is not None]
        typical = [e["metrics"][m] for e in ctx.quantiles if e["metrics"].get(m) is not None]
        if not vals or not typical:
            return none
        c = {"metric": m, "op": ">" if r > 0 else "<", "value": round((float(np.mean(vals)) + float(np.median(typical))) / 2, 6)}
        return _text([(c, r)])
    s = ctx.steps
    lo, hi = s.levels()
    rows = s.rows(VALIDATE)
    act, met = s.act[rows], s.metrics[rows]
    active, quiet = act >= hi, act <= lo
    cands = _candidates(ctx)
    chosen: list[tuple[dict[str, Any], float]] = []
    if cands and not (active.any() and quiet.any()):  # no validation steps of both kinds: the strongest term alone
        return _text(cands[:1])
    score = MIN_FIRST - min_gain  # the first term must reach MIN_FIRST on its own
    while cands and len(chosen) < max_terms:
        trials = [
            (balanced_accuracy(predict([c for c, _ in chosen] + [c], ctx.metrics, met), active, quiet), k)
            for k, (c, _) in enumerate(cands)
        ]
        best, k = max(trials, key=lambda t: (t[0], -t[1]))
        if not best >= score + min_gain:
            break
        chosen.append(cands.pop(k))
        score = best
    return _text(chosen) if chosen else none
