"""What an explainer sees of one latent, and what its explanation is scored on.

For a policy tap the recent steps (activation joined with the named metrics by step and env
index) are cut into episodes, from the run's episode ends, or into stretches of
``STRETCH_STEPS`` consecutive steps when none are known or an episode is long. Whole episodes
go to one of three splits, interleaved in time: ``EXPLAIN`` (the prompt's examples and the
correlations it shows), ``VALIDATE`` (where the rules backend decides whether another term
helps) and ``TEST`` (where explanations are scored). So held-out steps always come from other
episodes than the prompt's examples.

A language-model tap keeps the token view: top-activating tokens in their text, held-out
tokens from other forwards."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from explainer.prompt import render_prompt
from monitor.stats.analytics import key_of
from monitor.store.records import Store
from monitor.store.tapstats import tap_stats

__all__ = [
    "EXPLAIN",
    "VALIDATE",
    "TEST",
    "Steps",
    "LatentContext",
    "build_context",
    "prompt_hash",
    "render_prompt",
    "token_at",
    "token_context",
]

BEFORE, AFTER = 12, 3  # tokens of context shown around an activating token
EXPLAIN, VALIDATE, TEST = 0, 1, 2
SPLIT_PATTERN = (EXPLAIN, TEST, VALIDATE, EXPLAIN, TEST)  # episode g, in time order, goes to SPLIT_PATTERN[g % 5]
STRETCH_STEPS = 64  # the longest group of consecutive steps that is kept whole
MIN_GROUPS = 5


@dataclass
class Steps:
    """Recent steps of one latent, sorted by (env index, step), with their group and split."""

    act: np.ndarray  # [n] the latent
    metrics: np.ndarray  # [n, m]
    step: np.ndarray  # [n] int
    index: np.ndarray  # [n] int: the env row
    group: np.ndarray  # [n] int: episode or stretch, numbered in time order
    split: np.ndarray  # [n] int: EXPLAIN, VALIDATE or TEST
    episodes_known: bool = False

    def __len__(self) -> int:
        return len(self.act)

    def rows(self, split: int) -> np.ndarray:
        return np.nonzero(self.split == split)[0]

    def before(self, i: int, k: int) -> list[int]:
        """Up to ``k`` rows just before row ``i``: same env and group, consecutive steps."""
        out: list[int] = []
        j = i - 1
        while j >= 0 and len(out) < k and self.group[j] == self.group[i] and self.step[j] == self.step[i] - len(out) - 1:
            out.append(j)
            j -= 1
        return out[::-1]

    def levels(self) -> tuple[float, float]:
        """(quiet, active): a step at or below ``quiet`` does not activate; one at or above
        ``active`` does. Active is the top fifth of the window (for a sparse latent: any
        activation); quiet is the lower half (for a sparse latent: zero)."""
        a = self.act
        nonneg = bool(np.min(a) >= 0)
        q80, q50 = float(np.quantile(a, 0.8)), float(np.quantile(a, 0.5))
        if nonneg and q80 <= 1e-9:  # sparse: active means nonzero
            return 0.0, float(np.min(a[a > 1e-9])) if np.any(a > 1e-9) else 1.0
        return (max(q50, 0.0) if nonneg else q50), q80

    def scale(self) -> tuple[float, float]:
        """(zero, ten): the activation range the 0-10 scale of the prompt maps, after Bills et al.
        (10 is the highest activation among the prompt's steps, 0 a silent unit or a typical value)."""
        ex = self.act[self.rows(EXPLAIN)] if len(self.rows(EXPLAIN)) else self.act
        zero = 0.0 if np.min(self.act) >= 0 else float(np.median(self.act))
        return zero, max(float(np.max(ex)), zero + 1e-9)

    def norm(self, values: np.ndarray) -> np.ndarray:
        zero, ten = self.scale()
        return np.clip(np.round(10 * (np.asarray(values, dtype=np.float64) - zero) / (ten - zero)), 0, 10).astype(int)


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
    steps: Steps | None = None  # a policy tap's recent steps, split
    heldout_values: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [n] the latent on TEST rows
    heldout_metrics: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [n, metrics]

    tokens: bool = False  # examples carry "token" and "context" (a language-model tap)
    heldout_tokens: list[str] = field(default_factory=list)  # [n] the token of each held-out row, when tokens

    @property
    def example_steps(self) -> list[int]:
        return sorted({e["step"] for e in self.top + self.quantiles})


def _groups(step: np.ndarray, index: np.ndarray, episodes: list[dict[str, Any]], stretch: int) -> np.ndarray:
    """A group id per row (rows sorted by index, step): its episode, cut into ``stretch``-step
    pieces, numbered by first step so that the split pattern interleaves them in time."""
    ends: dict[int, list[int]] = {}
    for e in episodes:
        ends.setdefault(int(e["index"]), []).append(int(e["step"]))
    ep = np.zeros(len(step), dtype=np.int64)
    for ix, at in ends.items():
        m = index == ix
        ep[m] = np.searchsorted(np.sort(np.asarray(at)), step[m], side="left")  # an episode's end step is its last
    run_start = np.r_[True, (index[1:] != index[:-1]) | (ep[1:] != ep[:-1])] if len(step) else np.zeros(0, bool)
    first = step[np.nonzero(run_start)[0][np.cumsum(run_start) - 1]]
    piece = (step - first) // stretch
    new = run_start | np.r_[False, piece[1:] != piece[:-1]] if len(step) else run_start
    gid = np.cumsum(new) - 1
    starts = step[new]
    rank = np.empty(len(starts), dtype=np.int64)
    rank[np.argsort(starts, kind="stable")] = np.arange(len(starts))
    return rank[gid]


def split_steps(act: np.ndarray, metrics: np.ndarray, pos: np.ndarray, episodes: list[dict[str, Any]]) -> Steps:
    order = np.lexsort((pos[:, 0], pos[:, 1]))
    act, metrics, step, index = act[order], metrics[order], pos[order, 0], pos[order, 1]
    stretch = STRETCH_STEPS
    group = _groups(step, index, episodes, stretch)
    while group.max(initial=0) + 1 < MIN_GROUPS and stretch > 16:
        stretch //= 2
        group = _groups(step, index, episodes, stretch)
    split = np.asarray(SPLIT_PATTERN)[group % len(SPLIT_PATTERN)]
    return Steps(act, metrics, step, index, group, split, episodes_known=bool(episodes))


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.std(a) < 1e-12 or np.std(b) < 1e-12:
        return None
    return round(float(np.corrcoef(a, b)[0, 1]), 4)


def _step_dict(s: Steps, names: list[str], i: int) -> dict[str, Any]:
    return {
        "step": int(s.step[i]),
        "index": int(s.index[i]),
        "value": round(float(s.act[i]), 6),
        "norm": int(s.norm(s.act[i : i + 1])[0]),
        "metrics": {n: round(float(v), 6) for n, v in zip(names, s.metrics[i], strict=True)},
    }


def policy_examples(
    s: Steps, names: list[str], *, top: int = 8, before: int = 3, quiet: int = 6, seed: int = 0
) -> tuple[list, list]:
    """The prompt's examples, all from EXPLAIN rows: the top activations (at most two per
    episode, apart in time), each with the steps before it, and a few random quiet steps."""
    rows = s.rows(EXPLAIN)
    picked: list[int] = []
    per_group: dict[int, int] = {}
    for i in rows[np.argsort(-s.act[rows], kind="stable")]:
        g = int(s.group[i])
        if per_group.get(g, 0) >= 2 or any(s.group[j] == g and abs(int(s.step[j]) - int(s.step[i])) <= before for j in picked):
            continue
        picked.append(int(i))
        per_group[g] = per_group.get(g, 0) + 1
        if len(picked) == top:
            break
    out = []
    for i in picked:
        e = _step_dict(s, names, i)
        e["before"] = [_step_dict(s, names, j) for j in s.before(i, before)]
        out.append(e)
    lo, _ = s.levels()
    calm = rows[s.act[rows] <= lo]
    rng = np.random.default_rng(seed)
    calm = rng.choice(calm, size=min(quiet, len(calm)), replace=False) if len(calm) else calm
    return out, [_step_dict(s, names, int(i)) for i in sorted(calm)]


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
    if recent is None or not met or not all(m in met for m in ctx.metrics):
        return ctx
    rows, pos = recent
    mpos = met[ctx.metrics[0]][1]
    mvals = np.stack([met[m][0] for m in ctx.metrics], axis=1)
    where = {int(k): i for i, k in enumerate(key_of(mpos))}
    if ctx.tokens:  # held out: the rows of forwards none of whose tokens are an example
        used = set(ctx.example_steps)
        pairs = [(i, where[int(k)]) for i, k in enumerate(key_of(pos)) if int(k) in where and int(pos[i, 0]) not in used]
        if pairs:
            ai, mi = np.array(pairs).T
            ctx.heldout_values, ctx.heldout_metrics = rows[ai, latent].astype(np.float64), mvals[mi]
            held = store.tokens(run, pos[ai, 0].tolist())
            ctx.heldout_tokens = [token_at(held[int(st)], int(ix)) if int(st) in held else "" for st, ix in pos[ai]]
        return ctx
    pairs = [(i, where[int(k)]) for i, k in enumerate(key_of(pos)) if int(k) in where]
    if len(pairs) < 20:
        return ctx
    ai, mi = np.array(pairs).T
    s = split_steps(rows[ai, latent].astype(np.float64), mvals[mi].astype(np.float64), pos[ai], store.episodes(run))
    ctx.steps = s
    ex = s.rows(EXPLAIN)
    ctx.corr = {m: _corr(s.act[ex], s.metrics[ex, j]) for j, m in enumerate(ctx.metrics)}
    ctx.top, ctx.quantiles = policy_examples(s, ctx.metrics)
    test = s.rows(TEST)
    ctx.heldout_values, ctx.heldout_metrics = s.act[test], s.metrics[test]
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


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]
