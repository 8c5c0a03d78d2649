"""Scores: on held-out steps, does the explanation predict the latent? After Bills et al. (2023,
"Language models can explain neurons in language models") and EleutherAI's delphi.

A judge (the ``rules`` judge, or an LLM: the explaining backend or a ``--scorer``) sees only the
explanation and TEST steps (:mod:`explainer.judges` says which) and answers three ways:

- **detection**: which steps activate? balanced accuracy, F1 and AUROC;
- **fuzzing**: is the marked step of a stretch the one that activates? the same three;
- **simulation**: the activation of every step, 0-10; the Pearson correlation with the truth.

Each number comes with a 95% bootstrap interval over the held-out examples and two baselines:
the same predictions against **shuffled** labels (the chance level, with the 2.5-97.5%
range of 500 shuffles), and the **strongest metric**: the one metric most correlated with the
latent on the non-test steps, "fires when M is high", scored by the same judge on the same
examples: the fair bar for an RL explanation, since any policy unit correlates with something.
``above_baselines`` says whether the explanation's interval is above both."""

from __future__ import annotations

from typing import Any

import numpy as np

from explainer.conditions import describe, predict, soft
from explainer.context import EXPLAIN, TEST, VALIDATE, LatentContext
from explainer.judges import detection_items, fuzzing_items, simulation_stretches
from explainer.rules import best_condition

__all__ = ["score_explanation", "strongest_metric", "token_score", "interval", "N_BOOT"]

N_BOOT = 500
SIZES = {"rules": (80, 80, 24, 24), "llm": (24, 24, 8, 8)}  # detection/fuzzing positives, negatives; stretches top, random


def _ba(y: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Balanced accuracy per row of [B, n] labels and decisions (NaN where a class is missing)."""
    pos, neg = y.sum(-1), (~y).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((d & y).sum(-1) / pos + (~d & ~y).sum(-1) / neg) / 2


def _f1(y: np.ndarray, d: np.ndarray) -> np.ndarray:
    tp, fp, fn = (d & y).sum(-1), (d & ~y).sum(-1), (~d & y).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)


def _auroc(y: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The probability that a positive outranks a negative (ties half), per row."""
    out = np.full(y.shape[0], np.nan)
    for b in range(y.shape[0]):
        p, q = g[b][y[b]], g[b][~y[b]]
        if len(p) and len(q):
            out[b] = float((p[:, None] > q[None, :]).mean() + 0.5 * (p[:, None] == q[None, :]).mean())
    return out


def _pearson(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    tc, pc = t - t.mean(-1, keepdims=True), p - p.mean(-1, keepdims=True)
    den = np.sqrt((tc**2).sum(-1) * (pc**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-12, (tc * pc).sum(-1) / den, np.nan)


def _r(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 4)


def interval(stat: Any, *arrays: np.ndarray, rng: np.random.Generator, n_boot: int = N_BOOT) -> dict[str, Any]:
    """``stat`` on the examples, and the 2.5-97.5 percentiles of it over bootstrap resamples."""
    n = len(arrays[0])
    value = float(stat(*(a[None, :] for a in arrays))[0])
    idx = rng.integers(0, n, (n_boot, n))
    boots = stat(*(a[idx] for a in arrays))
    boots = boots[np.isfinite(boots)]
    ci = [_r(np.percentile(boots, 2.5)), _r(np.percentile(boots, 97.5))] if len(boots) else [None, None]
    return {"value": _r(value), "ci": ci}


def _shuffled(stat: Any, truth: np.ndarray, *preds: np.ndarray, rng: np.random.Generator, n: int = N_BOOT) -> dict[str, Any]:
    """The chance level: ``stat`` with the truth permuted, mean and 2.5-97.5 percentiles."""
    perm = np.argsort(rng.random((n, len(truth))), axis=1)
    vals = stat(truth[perm], *(np.broadcast_to(p, (n, len(p))) for p in preds))
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return {"value": None, "ci": [None, None]}
    return {"value": _r(vals.mean()), "ci": [_r(np.percentile(vals, 2.5)), _r(np.percentile(vals, 97.5))]}


def _classification(y: np.ndarray, d: list, g: list, rng: np.random.Generator) -> tuple[dict[str, Any], np.ndarray]:
    ok = np.array([v is not None for v in d], dtype=bool)
    y, dd, gg = (
        y[ok],
        np.array([v for v in d if v is not None], dtype=float) >= 0.5,
        np.array([v for v in g if v is not None], dtype=float),
    )
    out: dict[str, Any] = {"n": int(ok.sum()), "unanswered": int((~ok).sum())}
    if len(y) < 4 or y.all() or not y.any():
        return out | {"balanced_accuracy": None, "f1": None, "auroc": None}, ok
    out["balanced_accuracy"] = interval(_ba, y, dd, rng=rng)
    out["f1"] = interval(_f1, y, dd, rng=rng)
    out["auroc"] = interval(_auroc, y, gg, rng=rng)
    out["_shuffled"] = {
        "balanced_accuracy": _shuffled(_ba, y, dd, rng=rng),
        "f1": _shuffled(_f1, y, dd, rng=rng),
        "auroc": _shuffled(_auroc, y, gg, rng=rng, n=100),
    }
    return out, ok


def _simulation(truth: np.ndarray, pred: list, rng: np.random.Generator) -> dict[str, Any]:
    ok = np.array([v is not None for v in pred], dtype=bool)
    t, p = truth[ok], np.array([v for v in pred if v is not None], dtype=float)
    out: dict[str, Any] = {"n": int(ok.sum()), "unanswered": int((~ok).sum())}
    if len(t) < 10 or np.std(t) < 1e-12:
        return out | {"correlation": None}
    out["correlation"] = interval(_pearson, t, p, rng=rng)
    out["_shuffled"] = {"correlation": _shuffled(_pearson, t, p, rng=rng)}
    return out


def strongest_metric(ctx: LatentContext) -> dict[str, Any] | None:
    """The baseline explanation: the metric most correlated with the latent on EXPLAIN and
    VALIDATE steps, with its best threshold there."""
    s = ctx.steps
    if s is None:
        return None
    rows = np.concatenate([s.rows(EXPLAIN), s.rows(VALIDATE)])
    act, met = s.act[rows], s.metrics[rows]
    lo, hi = s.levels()
    rs = [
        abs(float(np.corrcoef(act, met[:, j])[0, 1])) if np.std(met[:, j]) > 1e-12 and np.std(act) > 1e-12 else 0.0
        for j in range(met.shape[1])
    ]
    if not rs or max(rs) == 0.0:
        return None
    j = int(np.argmax(rs))
    m = ctx.metrics[j]
    r = float(np.corrcoef(act, met[:, j])[0, 1])
    c, _ = best_condition(met[:, j], act >= hi, act <= lo, ">" if r > 0 else "<", m)
    return {
        "label": f"{'high' if r > 0 else 'low'} {m}",
        "text": f"Fires when {describe(c)}.",
        "conditions": [c],
        "metric": m,
        "r": round(r, 4),
    }


PRIMARY = {"detection": "balanced_accuracy", "fuzzing": "balanced_accuracy", "simulation": "correlation"}


def _above(res: dict[str, Any], key: str) -> bool | None:
    mine = res.get(key)
    if not mine or mine["ci"][0] is None:
        return None
    chance = res["baselines"]["shuffled"].get(key) or {}
    bar = res["baselines"].get("strongest_metric", {}).get(key) or {}
    return bool(
        (chance.get("ci", [None, None])[1] is None or mine["ci"][0] > chance["ci"][1])
        and (bar.get("value") is None or mine["ci"][0] > bar["value"])
    )


def score_explanation(ctx: LatentContext, explanation: dict[str, Any], judge: Any, *, seed: int = 0) -> dict[str, Any]:
    """Detection, fuzzing and simulation of ``explanation`` by ``judge`` on TEST steps, each
    with its interval and baselines (see the module's docstring)."""
    s = ctx.steps
    assert s is not None
    base = {"judge": judge.name, "n": int(len(s.rows(TEST))), "held_out": "episodes" if s.episodes_known else "stretches"}
    if not judge.can_judge(explanation):
        unscored = dict.fromkeys(("balanced_accuracy", "shuffled", "simulation", "simulation_shuffled", "baseline_metric"))
        return base | unscored | {"note": "the explanation states no condition the rules judge can check", "methods": {}}
    n_pos, n_neg, n_top, n_rand = SIZES["rules" if judge.name == "rules" else "llm"]
    rng = np.random.default_rng(seed)
    items = {"detection": detection_items(s, rng, n_pos, n_neg), "fuzzing": fuzzing_items(s, rng, n_pos, n_neg)}
    seqs = simulation_stretches(s, rng, n_top, n_rand)
    bar = strongest_metric(ctx)
    same = bar is not None and bar["conditions"] == explanation.get("conditions") and judge.name == "rules"
    methods: dict[str, Any] = {}
    for method, its in items.items():
        if not its:
            methods[method] = None
            continue
        y = np.array([it.label for it in its], dtype=bool)
        ask = judge.detect if method == "detection" else judge.fuzz
        res, _ = _classification(y, *ask(explanation, its), rng)
        res["baselines"] = {"shuffled": res.pop("_shuffled", {})}
        if bar is not None:
            b, _ = (res, None) if same else _classification(y, *ask(bar, its), rng)
            res["baselines"]["strongest_metric"] = {"metric": bar["metric"]} | {
                k: b.get(k) for k in ("balanced_accuracy", "f1", "auroc")
            }
        res["above_baselines"] = _above(res, PRIMARY[method])
        methods[method] = res
    if seqs:
        truth = s.act[[i for seq in seqs for i in seq]]
        res = _simulation(truth, judge.simulate(explanation, seqs), rng)
        res["baselines"] = {"shuffled": res.pop("_shuffled", {})}
        if bar is not None:
            b = res if same else _simulation(truth, judge.simulate(bar, seqs), rng)
            res["baselines"]["strongest_metric"] = {"metric": bar["metric"], "correlation": b.get("correlation")}
        res["above_baselines"] = _above(res, "correlation")
        methods["simulation"] = res
    else:
        methods["simulation"] = None

    def value(method: str, key: str, shuffled: bool = False) -> float | None:
        res = methods.get(method) or {}
        got = (res.get("baselines", {}).get("shuffled", {}) if shuffled else res).get(key) or {}
        return got.get("value")

    return base | {
        "balanced_accuracy": value("detection", "balanced_accuracy"),
        "shuffled": value("detection", "balanced_accuracy", True),
        "simulation": value("simulation", "correlation"),
        "simulation_shuffled": value("simulation", "correlation", True),
        "baseline_metric": bar["metric"] if bar else None,
        "methods": methods,
    }


def token_score(
    conditions: list[dict[str, Any]],
    metric_names: list[str],
    values: np.ndarray,
    metrics: np.ndarray,
    *,
    tokens: list[str] | None = None,
    top_frac: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """A language-model tap's score, from its token conditions on held-out tokens: detection
    (is the token among the named ones when the latent is in its top ``top_frac``?) and
    simulation, with intervals and the shuffled baseline."""
    n = len(values)
    base: dict[str, Any] = {"judge": "rules", "n": n, "top_frac": top_frac}
    if n < 20 or not conditions:
        return base | {"balanced_accuracy": None, "shuffled": None, "simulation": None, "simulation_shuffled": None}
    rng = np.random.default_rng(seed)
    values = np.asarray(values, dtype=np.float64)
    truth = values > np.quantile(values, 1 - top_frac)
    pred = predict(conditions, metric_names, metrics, tokens)
    sim = soft(conditions, metric_names, metrics, tokens)
    det = interval(_ba, truth, pred, rng=rng)
    corr = interval(_pearson, values, sim, rng=rng)
    chance, chance_sim = _shuffled(_ba, truth, pred, rng=rng), _shuffled(_pearson, values, sim, rng=rng)
    return base | {
        "balanced_accuracy": det["value"],
        "shuffled": chance["value"],
        "simulation": corr["value"],
        "simulation_shuffled": chance_sim["value"],
        "methods": {
            "detection": {"n": n, "balanced_accuracy": det, "baselines": {"shuffled": {"balanced_accuracy": chance}}},
            "simulation": {"n": n, "correlation": corr, "baselines": {"shuffled": {"correlation": chance_sim}}},
        },
    }
