"""What the panel shows, read from Redis as plain tables: no Streamlit here, so each view is
testable on its own and the Streamlit script only lays them out.

Every function reads; none writes. Empty results are empty lists or None, and the panel turns
them into a sentence saying what to do.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pandas as pd

from monitor.store.records import Store
from monitor.store.tapstats import tap_stats

__all__ = [
    "overview",
    "heatmap",
    "metric_traces",
    "latent_card",
    "corr_matrix",
    "alerts_feed",
    "transcoder_table",
    "token_trace",
    "cross_prompt",
    "latent_taps_for",
    "token_latents",
    "is_latent_tap",
    "before_activations",
]

SEVERITIES = ("critical", "warning", "info")


def is_latent_tap(tap: str) -> bool:
    from monitor.store.keys import LATENT_PREFIX

    return tap.startswith(LATENT_PREFIX)


def overview(store: Store) -> dict[str, Any]:
    """Runs (one row each), service health, the rejected-frame counts and the newest alerts."""
    st = store.status()
    runs = [
        {
            "run": r["run"],
            "taps": ", ".join(sorted(r["taps"])),
            "steps": r["steps"],
            "steps/s": round(r["steps_per_s"], 1),
            "rows/s": round(r["rows_per_s"], 1),
            "drops": r["drops"],
            "gaps": r["gaps"],
            "lag ms": round(1000 * r["lag_s"], 1),
            "episodes": r["episodes"],
            "return (last 100)": round(r["return_mean_100"], 1),
            "last seen s": round(r["last_seen_s"], 1),
            "served by": r.get("monitor", ""),
        }
        for r in st["runs"]
    ]
    now = time.time()
    services = [
        {
            "kind": h.get("kind", "?"),
            "id": h.get("id", "?"),
            "pid": h.get("pid"),
            "detail": ", ".join(
                f"{k}={h[k]}" for k in ("frames", "rows", "runs", "leases", "backend", "done", "failed") if k in h
            ),
            "age s": round(now - float(h.get("time", now)), 1) if "time" in h else None,
        }
        for h in st["services"]
    ]
    return {
        "runs": runs,
        "services": services,
        "rejected": st["monitor"]["rejected"],
        "monitor_alive": st["monitor"]["alive"],
        "explainers": sum(1 for h in st["services"] if h.get("kind") == "explainer"),
        "alerts": [a for _, a in reversed(store.last_alerts(None, 10))],
    }


def _by_step(rows: np.ndarray, pos: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows averaged over each step's indices (vector envs, tokens), the last ``steps`` steps."""
    uniq, inv = np.unique(pos[:, 0], return_inverse=True)
    sums = np.zeros((len(uniq), rows.shape[1]))
    np.add.at(sums, inv, rows)
    mean = sums / np.bincount(inv, minlength=len(uniq))[:, None]
    return uniq[-steps:], mean[-steps:]


def heatmap(store: Store, run: str, tap: str, *, steps: int = 200, max_latents: int = 64) -> pd.DataFrame | None:
    """Long table (step, latent, value) of the recent activations, for a heatmap; the
    ``max_latents`` most variable latents of a wide tap."""
    got = store.recent(run, tap)
    if got is None or len(got[0]) == 0:
        return None
    st, mean = _by_step(*got, steps)
    cols = np.arange(mean.shape[1])
    if len(cols) > max_latents:
        cols = np.sort(np.argsort(-mean.std(axis=0))[:max_latents])
    return pd.DataFrame(
        {"step": np.repeat(st, len(cols)), "latent": np.tile(cols, len(st)), "value": mean[:, cols].reshape(-1).astype(float)}
    )


def metric_traces(
    store: Store, run: str, first_step: int, last_step: int, *, names: list[str] | None = None
) -> pd.DataFrame | None:
    """Long table (step, metric, value) of the run's recent metrics in a step range."""
    met = store.recent_metrics(run)
    frames = []
    for name, (vals, pos) in met.items():
        if names is not None and name not in names or len(vals) == 0:
            continue
        st, mean = _by_step(vals.reshape(-1, 1), pos, len(vals))
        keep = (st >= first_step) & (st <= last_step)
        frames.append(pd.DataFrame({"step": st[keep], "metric": name, "value": mean[keep, 0]}))
    return pd.concat(frames, ignore_index=True) if frames else None


def latent_card(store: Store, run: str, tap: str, latent: int, *, top: int = 10) -> dict[str, Any] | None:
    """One latent: statistics, correlations, top-activating steps, explanation, and its alerts
    among the run's newest 500 alert events."""
    d = tap_stats(store, run, tap, top=top)
    if d is None or not 0 <= latent < d["width"]:
        return None
    ch = d["channels"][latent]
    stats = {k: ch.get(k) for k in ("count", "mean", "std", "min", "max")}
    stats.update({f"window {k}": v for k, v in (ch.get("window") or {}).items()})
    # a null correlation (a constant metric or latent in the window) stays, as a row without r
    corr = pd.DataFrame([{"metric": m, "r": r} for m, r in ch.get("corr", {}).items()], columns=["metric", "r"])
    rows = [{"step": e["step"], "index": e["index"], "value": e["value"], **e["metrics"]} for e in ch.get("top", [])]
    alerts = [a for _, a in store.last_alerts(run, 500) if a.get("tap") == tap and a.get("latent") == latent]
    return {
        "width": d["width"],
        "stats": stats,
        "corr": corr,
        "top": pd.DataFrame(rows),
        "explanation": store.explanation(run, tap, latent),
        "alerts": alerts[-20:],
    }


def corr_matrix(store: Store, run: str, tap: str, *, sort_by: str | None = None, ew: bool = False) -> pd.DataFrame | None:
    """Latents × metrics correlation table (rows sorted by |r| with ``sort_by``, when given)."""
    d = tap_stats(store, run, tap, top=0)
    if d is None or not d.get("metrics"):
        return None
    key = "ew_corr" if ew else "corr"
    df = pd.DataFrame([{m: ch[key].get(m) for m in d["metrics"]} for ch in d["channels"]], dtype=float)
    df.index.name = "latent"
    if sort_by in df.columns:
        df = df.reindex(df[sort_by].abs().sort_values(ascending=False, na_position="last").index)
    return df


def alerts_feed(
    store: Store,
    *,
    run: str | None = None,
    severity: list[str] | None = None,
    rule: list[str] | None = None,
    state: list[str] | None = None,
    limit: int = 500,
) -> list[dict[str, Any]]:
    """The newest alert events (of the last 2,000), newest first, filtered by run, severity, rule and state."""
    out = []
    for _, a in reversed(store.last_alerts(run, 2000)):
        if (
            severity
            and a.get("severity") not in severity
            or rule
            and a.get("rule") not in rule
            or state
            and a.get("state") not in state
        ):
            continue
        out.append(a)
        if len(out) >= limit:
            break
    return out


def transcoder_table(store: Store) -> pd.DataFrame:
    """Every registered transcoder with its quality figures."""
    rows = []
    for t in store.transcoders(include_broken=True):
        q = t.get("quality") or {}
        if "run" not in t:  # a registry entry that is not one
            rows.append({"name": t["name"], "broken": t["broken"]})
            continue
        rows.append(
            {
                "name": t["name"],
                "broken": t.get("broken"),
                "run": t["run"],
                "source": t["source"],
                "target": t["target"],
                "latents": t["d_sae"],
                "arch": t.get("architecture"),
                "L0": q.get("l0"),
                "FVU": q.get("fvu"),
                "dead": q.get("dead_frac"),
                "return recovered": q.get("return_recovered"),
                "active": bool(t.get("active", True)),
            }
        )
    return pd.DataFrame(rows)


def _sequence(tokens: dict[int, dict], step: int) -> list[int]:
    """The consecutive forwards of one sequence around ``step``: a prompt and the generation
    steps that continue it (``start`` > 0)."""

    def follows(s: int) -> bool:  # forward s continues forward s - 1 exactly
        a, b = tokens.get(s - 1), tokens[s]
        return a is not None and b["start"] > 0 and a["start"] + len(a["rows"][0]) - a["context"] == b["start"]

    first = last = step
    while follows(first):
        first -= 1
    while last + 1 in tokens and follows(last + 1):
        last += 1
    return list(range(first, last + 1))


def token_trace(
    store: Store,
    run: str,
    tap: str,
    latent: int,
    step: int,
    *,
    tokens: dict[int, dict] | None = None,
    got: tuple[np.ndarray, np.ndarray] | None = None,
) -> pd.DataFrame | None:
    """One sequence: (position, token, value) of a latent over the tokens of forward ``step`` (the
    first sequence of a batch), with the generation steps before and after it when it has them.
    ``tokens`` and ``got`` (the tap's recent rows) may be passed in when already read."""
    got = store.recent(run, tap) if got is None else got
    tokens = store.tokens(run, store.token_steps(run)) if tokens is None else tokens
    if step not in tokens or got is None:
        return None
    rows, pos = got
    parts = []
    for s in _sequence(tokens, step):
        tk = tokens[s]
        context, length = tk["context"], len(tk["rows"][0]) - tk["context"]
        sel = pos[:, 0] == s
        idx = pos[sel, 1]
        first = idx < length
        if first.any():
            parts.append(
                pd.DataFrame(
                    {
                        "position": tk["start"] + idx[first],
                        "token": [tk["rows"][0][context + i] for i in idx[first]],
                        "value": rows[sel][first, latent].astype(float),
                    }
                )
            )
    return pd.concat(parts, ignore_index=True) if parts else None


def cross_prompt(store: Store, run: str, tap: str, latent: int, *, prompts: int = 12) -> pd.DataFrame | None:
    """The last ``prompts`` sequences still in the recent rows: (prompt, position, token, value);
    ``prompt`` is the step of the sequence's first forward."""
    got = store.recent(run, tap)
    if got is None:
        return None
    tokens = store.tokens(run, store.token_steps(run))
    firsts = list(dict.fromkeys(_sequence(tokens, int(s))[0] for s in np.unique(got[1][:, 0]) if int(s) in tokens))
    frames = []
    for s in firsts[-prompts:]:
        tr = token_trace(store, run, tap, latent, s, tokens=tokens, got=got)
        if tr is not None:
            frames.append(tr.assign(prompt=s))
    return pd.concat(frames, ignore_index=True) if frames else None


def latent_taps_for(store: Store, run: str, tap: str) -> list[str]:
    """The latent taps of ``run`` that hold ``tap``'s latents: the tap itself when it is one, else
    those of the registered transcoders that read it (and have streamed)."""
    if is_latent_tap(tap):
        return [tap]
    from monitor.store.keys import LATENT_PREFIX

    have = store.taps(run)
    return sorted(
        LATENT_PREFIX + t["name"]
        for t in store.transcoders()
        if t.get("source") == tap and t.get("run") in (run, "*") and LATENT_PREFIX + t["name"] in have
    )


def token_latents(store: Store, run: str, tap: str, *, top: int = 3, step: int | None = None) -> pd.DataFrame | None:
    """Per token of one sequence, its ``top`` most active latents of ``tap`` (a ``latents:`` tap)
    and their explanations: one row per token (step, position, token, generated, then ``latent r``,
    ``value r``, ``explanation r`` for r = 1..top; empty where fewer latents are active, > 0).

    The sequence is the one holding forward ``step``, by default the latest one in the tap's recent
    rows (the first sequence of a batch, as :func:`token_trace`); ``generated`` marks the tokens of
    its generation steps (every forward after its first). The values are the tap's recent rows, the
    latents the monitor encoded online, so a sequence longer than the rows kept shows its tail."""
    got = store.recent(run, tap)
    if got is None or len(got[0]) == 0:
        return None
    tokens = store.tokens(run, store.token_steps(run))
    rows, pos = got
    if step is None:
        named = [int(s) for s in np.unique(pos[:, 0]) if int(s) in tokens]
        if not named:
            return None
        step = named[-1]
    elif step not in tokens:
        return None
    seq = _sequence(tokens, step)
    out: list[dict[str, Any]] = []
    for s in seq:
        tk = tokens[s]
        context, length = tk["context"], len(tk["rows"][0]) - tk["context"]
        sel = np.nonzero(pos[:, 0] == s)[0]
        sel = sel[pos[sel, 1] < length]
        for r in sel[np.argsort(pos[sel, 1], kind="stable")]:
            i = int(pos[r, 1])
            v = rows[r].astype(float)
            best = np.argsort(-v, kind="stable")[:top]
            best = best[v[best] > 0]
            row: dict[str, Any] = {
                "step": s,
                "position": tk["start"] + i,
                "token": tk["rows"][0][context + i],
                "generated": s != seq[0],
            }
            for k in range(top):
                row[f"latent {k + 1}"] = int(best[k]) if k < len(best) else None
                row[f"value {k + 1}"] = float(v[best[k]]) if k < len(best) else None
            out.append(row)
    if not out:
        return None
    df = pd.DataFrame(out)
    wanted = sorted({int(x) for k in range(top) for x in df[f"latent {k + 1}"].dropna()})
    labels = _labels(store, run, tap, wanted)
    for k in range(top):
        col = df[f"latent {k + 1}"]
        df[f"explanation {k + 1}"] = [labels.get(int(x), "") if pd.notna(x) else "" for x in col]
        df[f"latent {k + 1}"] = col.astype("Int64")
    order = ["step", "position", "token", "generated"]
    order += [f"{c} {k + 1}" for k in range(top) for c in ("latent", "value", "explanation")]
    return df[order]


def _labels(store: Store, run: str, tap: str, latents: list[int]) -> dict[int, str]:
    """The explanation labels of these latents, where the explainer has written one (one read)."""
    if not latents:
        return {}
    from monitor.store import keys

    blobs = store.r.hmget(keys.explanations(run), [f"{tap}/{j}" for j in latents])
    out = {}
    for j, blob in zip(latents, blobs, strict=True):
        if blob:
            e = json.loads(blob)
            if not e.get("error") and e.get("label"):
                out[j] = str(e["label"])
    return out


def before_activations(
    store: Store, run: str, tap: str, latent: int, *, k: int = 20, peaks: int = 8
) -> tuple[pd.DataFrame, list[int]] | None:
    """What the run's metrics did in the ``k`` steps before the latent's strongest recent
    activations (an activation-triggered average): a long table (offset, metric, value, peak),
    offset -k..0 with 0 the activation's step, for up to ``peaks`` peaks at least ``k`` steps
    apart among the recent rows, and the peaks' steps. None without recent rows or metrics."""
    got = store.recent(run, tap)
    met = store.recent_metrics(run)
    if got is None or len(got[0]) == 0 or not met:
        return None
    steps, mean = _by_step(*got, len(got[0]))
    if not 0 <= latent < mean.shape[1]:
        return None
    v = mean[:, latent]
    chosen: list[int] = []
    for i in np.argsort(-v, kind="stable"):
        if v[i] <= 0 or len(chosen) >= peaks:
            break
        s = int(steps[i])
        if all(abs(s - c) >= k for c in chosen):
            chosen.append(s)
    if not chosen:
        return None
    frames = []
    for name, (vals, pos) in met.items():
        if name in ("terminated", "truncated"):
            continue
        st, m = _by_step(vals.reshape(-1, 1), pos, len(vals))
        at = {int(x): m[j, 0] for j, x in enumerate(st)}
        for peak in chosen:
            offs = [o for o in range(-k, 1) if peak + o in at]
            if offs:
                frames.append(pd.DataFrame({"offset": offs, "metric": name, "value": [at[peak + o] for o in offs], "peak": peak}))
    return (pd.concat(frames, ignore_index=True), sorted(chosen)) if frames else None
