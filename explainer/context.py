"""What an explainer sees of one latent: correlations, top-activating steps, quantile samples
(each with the named metric values), and held-out steps to score an explanation on."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.analytics import key_of
from monitor.report import tap_stats
from monitor.store import Store

__all__ = ["LatentContext", "build_context", "render_prompt"]


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

    @property
    def example_steps(self) -> list[int]:
        return sorted({e["step"] for e in self.top + self.quantiles})


def build_context(store: Store, run: str, tap: str, latent: int, *, top: int = 10) -> LatentContext | None:
    """None when the monitor has no analytics for this tap yet (no metrics paired)."""
    d = tap_stats(store, run, tap, top=top)
    if d is None or not d.get("metrics") or latent >= d["width"]:
        return None
    ch = d["channels"][latent]
    ctx = LatentContext(run=run, tap=tap, latent=latent, metrics=d["metrics"], corr=ch["corr"], top=ch["top"],
                        quantiles=ch["quantiles"], stats={k: ch.get(k) for k in ("count", "mean", "std", "min", "max")} | {"window": ch["window"]})
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
    return ctx


def _fmt_example(e: dict[str, Any]) -> str:
    ms = ", ".join(f"{k}={v:+.3f}" for k, v in e["metrics"].items() if v is not None)
    return f"  step {e['step']}: activation {e['value']:.3f}; {ms}"


def render_prompt(ctx: LatentContext) -> str:
    """The prompt an LLM backend gets (and whose hash every explanation records)."""
    corr = ", ".join(f"{m} {r:+.2f}" for m, r in sorted(((m, r) for m, r in ctx.corr.items() if r is not None), key=lambda x: -abs(x[1])))
    lines = [
        f"A unit of a neural network policy (run {ctx.run}, {ctx.tap}, #{ctx.latent}) is being watched while the agent acts.",
        f"Its statistics: {ctx.stats}.",
        f"Pearson correlation with each environment metric: {corr or 'none defined'}.",
        "The steps where it activates most:", *map(_fmt_example, ctx.top),
        "One step from each activation decile, lowest first:", *map(_fmt_example, ctx.quantiles),
        "In a short label and one or two sentences, say what situation this unit detects.",
    ]
    return "\n".join(lines)


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]
