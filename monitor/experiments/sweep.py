"""Intervention sweeps: nudge one transcoder latent at a time and measure what the policy does.

For each (latent, alpha) the policy runs a set of episodes with ``alpha * W_dec[latent]`` added
at a tap (the seed post's "add the decoder column" intervention, via
:func:`agent_side.steer.steer_latent`), on the same episode seeds as an unsteered baseline. Each
condition reports its mean return with a Student-t interval, how its episodes ended (see
:mod:`monitor.experiments.failure_modes`), and its difference from the baseline with a Welch interval and
p-value. :func:`scan` is the seed's future work: every latent at a small +-alpha, keeping those
whose nudge raises the mean return, Bonferroni-adjusted for the number of tests.

Results are plain JSON-able dicts (undefined numbers are None)::

    agent = load_agent("demo", data_dir=Path("data"))
    model, cfg = load_artifact("data/transcoders/some-run")
    res = sweep(agent, tap=cfg["metadata"]["target"], model=model, episodes=50)
    Path("sweep.json").write_text(json.dumps(res))
    Path("sweep.md").write_text(sweep_table_md(res))

The baseline and every condition share episode seeds, so they are paired; Welch's test ignores
the pairing and is the conservative choice. An agent with a ``reset()`` (see
:func:`~monitor.experiments.agents.as_agent`) starts every episode afresh.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import product
from pathlib import Path
from typing import Any

from agent_side.steer import steer_latent
from monitor.experiments import failure_modes
from monitor.experiments.agents import as_agent
from monitor.experiments.episodes import EpisodeResult, env_id_of, run_episodes, summarize
from monitor.stats.intervals import diff_ci
from monitor.transcoders.model import Transcoder
from monitor.transcoders.splice import Agent

__all__ = ["EpisodeResult", "run_episodes", "check_latents", "sweep", "scan", "sweep_table_md", "plot_sweep"]

log = logging.getLogger(__name__)


def check_latents(model: Transcoder, latents: Sequence[int] | None) -> list[int]:
    """The latents to test (default: all), or a ValueError naming those out of range."""
    if latents is None:
        return list(range(model.d_sae))
    bad = [i for i in latents if not 0 <= int(i) < model.d_sae]
    if bad:
        raise ValueError(f"latents {bad} out of range: the transcoder has {model.d_sae} (0..{model.d_sae - 1})")
    return [int(i) for i in latents]


def sweep(
    agent: Agent,
    *,
    tap: str,
    model: Transcoder,
    latents: Sequence[int] | None = None,
    alphas: Sequence[float] = (1.0, -1.0, 2.5, -2.5),
    episodes: int = 50,
    seed: int = 0,
    level: float = 0.95,
    env_id: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The seed post's intervention table: for every latent (default: all) and alpha, the policy's
    episodes with ``alpha * model.W_dec[latent]`` added at ``tap`` (normally the transcoder's
    target tap), against an unsteered baseline on the same seeds.

    Returns ``{"kind": "sweep", "tap", "env_id", "episodes", "seed", "level", "d_sae", "latents",
    "alphas", "modes", "baseline", "cells"}``; ``baseline`` and each cell hold ``n``, ``mean``,
    ``ci`` ([lo, hi]), ``std``, ``failures`` (a count for every mode in ``modes``, summing to
    ``n``) and per episode ``returns``, ``lengths`` and ``modes``; each cell adds ``latent``,
    ``alpha`` and ``diff`` (see :func:`diff_ci`).
    """
    from tqdm import tqdm

    latents = check_latents(model, latents)
    alphas = [float(a) for a in alphas]
    agent = as_agent(agent)
    root, make_env, _ = agent
    if env_id is None:
        env = make_env()
        env_id = env_id_of(env)
        env.close()
    log.info("sweep: %d latents x %d alphas x %d episodes at %s (%s)", len(latents), len(alphas), episodes, tap, env_id)
    baseline = summarize(run_episodes(agent, episodes=episodes, seed=seed, env_id=env_id), level=level)
    cells = []
    for latent, alpha in tqdm(list(product(latents, alphas)), desc="sweep", disable=not progress):
        with steer_latent(root, tap, model, latent, op="add", alpha=alpha):
            runs = run_episodes(agent, episodes=episodes, seed=seed, env_id=env_id)
        cell = {"latent": latent, "alpha": alpha, **summarize(runs, level=level)}
        cell["diff"] = diff_ci(baseline["returns"], cell["returns"], level=level)
        log.debug("latent %d alpha %g: mean %.2f (baseline %.2f)", latent, alpha, cell["mean"], baseline["mean"])
        cells.append(cell)
    seen = {m for c in [baseline, *cells] for m in c["failures"]}
    modes = [*failure_modes.modes_for(env_id), *sorted(seen - set(failure_modes.modes_for(env_id)))]
    for c in [baseline, *cells]:
        c["failures"] = {m: c["failures"].get(m, 0) for m in modes}
    return {
        "kind": "sweep",
        "tap": tap,
        "env_id": env_id,
        "episodes": episodes,
        "seed": seed,
        "level": level,
        "d_sae": model.d_sae,
        "latents": latents,
        "alphas": alphas,
        "modes": modes,
        "baseline": baseline,
        "cells": cells,
    }


def scan(
    agent: Agent,
    *,
    tap: str,
    model: Transcoder,
    latents: Sequence[int] | None = None,
    alphas: Sequence[float] = (0.5, -0.5),
    episodes: int = 20,
    seed: int = 0,
    level: float = 0.95,
    env_id: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Every latent at small +-alpha: which nudges raise the mean return?

    A :func:`sweep` result plus, per cell, ``diff_adjusted`` (the Welch interval at the
    Bonferroni level ``1 - (1 - level) / tests``) and ``p_bonferroni``. ``improving`` lists the
    cells whose adjusted interval lies above 0, largest effect first; ``improving_unadjusted``
    those whose unadjusted one does (exploratory: expect ``(1 - level) / 2`` of null cells there).
    """
    res = sweep(
        agent,
        tap=tap,
        model=model,
        latents=latents,
        alphas=alphas,
        episodes=episodes,
        seed=seed,
        level=level,
        env_id=env_id,
        progress=progress,
    )
    tests = len(res["cells"])
    adj_level = 1.0 - (1.0 - level) / tests
    for c in res["cells"]:
        c["diff_adjusted"] = diff_ci(res["baseline"]["returns"], c["returns"], level=adj_level)
        p = c["diff"]["p_value"]
        c["p_bonferroni"] = None if p is None else min(1.0, p * tests)

    def above(key: str) -> list[dict[str, Any]]:
        hits = [c for c in res["cells"] if c[key]["ci"][0] is not None and c[key]["ci"][0] > 0.0]
        return [
            {
                "latent": c["latent"],
                "alpha": c["alpha"],
                "mean": c["mean"],
                "diff": c["diff"]["mean"],
                "ci": c[key]["ci"],
                "p_value": c["diff"]["p_value"],
                "p_bonferroni": c["p_bonferroni"],
            }
            for c in sorted(hits, key=lambda c: -c["diff"]["mean"])
        ]

    improving = above("diff_adjusted")
    res.update(
        kind="scan",
        tested_latents=res["latents"],
        tests=tests,
        bonferroni_level=adj_level,
        improving=improving,
        improving_unadjusted=above("diff"),
        note=f"{tests} tests; 'improving' uses Bonferroni-adjusted {adj_level:.4g} intervals of the "
        f"difference from baseline, 'improving_unadjusted' the nominal {level:g} ones",
    )
    log.info("scan: %d tests, %d improving after Bonferroni", tests, len(improving))
    return res


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def sweep_table_md(result: dict[str, Any]) -> str:
    """A markdown table of a :func:`sweep` or :func:`scan` result, one row per (latent, alpha);
    failure columns read ``baseline -> intervened`` counts; ``*`` marks a difference whose
    interval excludes 0."""
    base, modes = result["baseline"], result["modes"]
    pct = f"{result['level'] * 100:g}%"
    head = ["latent", "alpha", "baseline avg", f"intervened avg ± {pct} CI", f"diff [{pct} CI]", "p", *modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in result["cells"]:
        lo, hi = c["ci"]
        half = None if hi is None else hi - c["mean"]
        d = c["diff"]
        mark = "*" if d["excludes_zero"] else ""
        row = [
            str(c["latent"]),
            f"{c['alpha']:g}",
            _fmt(base["mean"]),
            f"{_fmt(c['mean'])} ± {_fmt(half)}",
            f"{_fmt(d['mean'])}{mark} [{_fmt(d['ci'][0])}, {_fmt(d['ci'][1])}]",
            _fmt(d["p_value"], ".3g"),
            *(f"{base['failures'][m]} → {c['failures'][m]}" for m in modes),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(result: dict[str, Any], path: Path | str, *, title: str | None = None) -> Path:
    """Mean return against alpha, one line per latent with interval error bars, over the baseline
    mean and its interval as a band; written to ``path`` (PNG, SVG, ... by suffix)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    base = result["baseline"]
    ax.axhline(base["mean"], color="0.3", lw=1, label=f"baseline {base['mean']:.1f}")
    if base["ci"][0] is not None:
        ax.axhspan(base["ci"][0], base["ci"][1], color="0.5", alpha=0.2, lw=0)
    alphas = sorted(set(result["alphas"]))
    span = (alphas[-1] - alphas[0]) or 1.0
    latents = result["latents"]
    for i, latent in enumerate(latents):
        cells = sorted((c for c in result["cells"] if c["latent"] == latent), key=lambda c: c["alpha"])
        shift = (i - (len(latents) - 1) / 2) * 0.01 * span  # keep overlapping error bars apart
        x = [c["alpha"] + shift for c in cells]
        y = [c["mean"] for c in cells]
        err = [
            [0.0 if c["ci"][0] is None else c["mean"] - c["ci"][0] for c in cells],
            [0.0 if c["ci"][1] is None else c["ci"][1] - c["mean"] for c in cells],
        ]
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, lw=1, label=f"latent {latent}")
    ax.set_xlabel("alpha (added × decoder row)")
    ax.set_ylabel(f"mean return ({result['level'] * 100:g}% CI)")
    ax.set_title(title or f"{result.get('kind', 'sweep')} at {result['tap']} ({result['episodes']} episodes each)")
    ax.legend(fontsize="small", ncol=max(1, len(latents) // 8))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
