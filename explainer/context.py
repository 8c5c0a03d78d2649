"""What an explainer sees of one latent: correlations, top-activating steps, quantile samples
(each with the named metric values), and held-out steps to score an explanation on."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.stats.analytics import key_of
from monitor.store.records import Store
from monitor.store.tapstats import tap_stats

__all__ = ["LatentContext", "build_context", "render_prompt", "token_context"]

BEFORE, AFTER = 12, 3  # tokens of context shown around an activating token


@dataclass
class LatentContext:
    run: str
    tap: str
    latent: int
    metrics: list[str]
    corr: dict[str, float | None]
    top: list[dict[str, Any]]
    quantiles: list[dict[str, Any]]
    stats: dict[str, Any]
    heldout_values: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [n] the latent
    heldout_metrics: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [n, metrics]

    tokens: bool = False  # examples carry "token" and "context" (a language-model tap)
    heldout_tokens: list[str] = field(default_factory=list)  # [n] the token of each held-out row, when tokens

    @property
    def example_steps(self) -> list[int]:
        return sorted({e["step"] for e in self.top + self.quantiles})


def build_context(store: Store, run: str, tap: str, latent: int, *, top: int = 10) -> LatentContext | None:
    """None when the monitor has no analytics for this tap yet (no metrics paired)."""
    d = tap_stats(store, run, tap, top=top)
    if d is None or not d.get("metrics") or latent >= d["width"]:
        return None
    ch = d["channels"][latent]
    ctx = LatentContext(
        run=run,
        tap=tap,
        latent=latent,
        metrics=d["metrics"],
        corr=ch["corr"],
        top=ch["top"],
        quantiles=ch["quantiles"],
        stats={k: ch.get(k) for k in ("count", "mean", "std", "min", "max")} | {"window": ch["window"]},
    )
    toks = store.tokens(run, ctx.example_steps)
    if toks:
        ctx.tokens = True
        for e in ctx.top + ctx.quantiles:
            tk = toks.get(e["step"])
            if tk:
                e["token"], e["context"] = token_at(tk, e["index"]), token_context(tk, e["index"])
    recent, met = store.recent(run, tap), store.recent_metrics(run)
    if recent is not None and met and all(m in met for m in ctx.metrics):
        rows, pos = recent
        mpos = met[ctx.metrics[0]][1]
        mvals = np.stack([met[m][0] for m in ctx.metrics], axis=1)
        where = {int(k): i for i, k in enumerate(key_of(mpos))}
        used = set(ctx.example_steps)
        pairs = [(i, where[int(k)]) for i, k in enumerate(key_of(pos)) if int(k) in where and int(pos[i, 0]) not in used]
        if pairs:
            ai, mi = np.array(pairs).T
            ctx.heldout_values, ctx.heldout_metrics = rows[ai, latent].astype(np.float64), mvals[mi]
            if ctx.tokens:
                held = store.tokens(run, pos[ai, 0].tolist())
                ctx.heldout_tokens = [token_at(held[int(st)], int(ix)) if int(st) in held else "" for st, ix in pos[ai]]
    return ctx


def _token_pos(tokens: dict[str, Any], index: int) -> tuple[list[str], int] | None:
    """The row of token ``index`` (``b * T + t``) of a forward and where in it that token is."""
    rows, context = tokens["rows"], tokens.get("context", 0)
    b, t = divmod(int(index), len(rows[0]) - context)
    return (rows[b], context + t) if b < len(rows) else None


def token_at(tokens: dict[str, Any], index: int) -> str:
    at = _token_pos(tokens, index)
    return at[0][at[1]] if at else ""


def token_context(tokens: dict[str, Any], index: int, *, before: int = BEFORE, after: int = AFTER) -> str:
    """The tokens around row ``index`` (``b * T + t``) of a forward, the token itself marked ⟦so⟧.
    A generation step's context is the tokens it continues (there is nothing after it yet)."""
    at = _token_pos(tokens, index)
    if at is None:
        return ""
    row, t = at
    return "".join(row[max(0, t - before) : t]) + f"⟦{row[t]}⟧" + "".join(row[t + 1 : t + 1 + after])


def _fmt_example(e: dict[str, Any]) -> str:
    if "context" in e:
        return f"  step {e['step']}, token {e['index']}: activation {e['value']:.3f}; text: {e['context']!r}"
    ms = ", ".join(f"{k}={v:+.3f}" for k, v in e["metrics"].items() if v is not None)
    return f"  step {e['step']}: activation {e['value']:.3f}; {ms}"


def render_prompt(ctx: LatentContext) -> str:
    """The prompt an LLM backend gets (and whose hash every explanation records)."""
    corr = ", ".join(
        f"{m} {r:+.2f}" for m, r in sorted(((m, r) for m, r in ctx.corr.items() if r is not None), key=lambda x: -abs(x[1]))
    )
    what = (
        "language model, shown text it reads; the token it fires on is marked ⟦so⟧"
        if ctx.tokens
        else "policy, watched while the agent acts"
    )
    lines = [
        f"A unit of a neural network {what} (run {ctx.run}, {ctx.tap}, #{ctx.latent}).",
        f"Its statistics: {ctx.stats}.",
        f"Pearson correlation with each environment metric: {corr or 'none defined'}.",
        "The steps where it activates most:",
        *map(_fmt_example, ctx.top),
        "One step from each activation decile, lowest first:",
        *map(_fmt_example, ctx.quantiles),
        "In a short label and one or two sentences, say what "
        + ("text pattern" if ctx.tokens else "situation")
        + " this unit detects.",
    ]
    return "\n".join(lines)


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]
