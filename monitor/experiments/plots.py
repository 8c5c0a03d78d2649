"""The interrogation's figures: the probe heatmap and the subspace curves (matplotlib, Agg, imported
only when a figure is drawn)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_probe_heatmap", "plot_ablation_curve"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path | str) -> Path:
    fig.tight_layout()
    fig.savefig(Path(path), dpi=100)
    plt.close(fig)
    return Path(path)


def plot_probe_heatmap(rows: list[dict[str, Any]], path: Path | str, *, title: str = "held-out R²") -> Path:
    """Metrics × probe kinds, coloured by held-out R² with the value (± its sd over the folds,
    where the row has one) written in each cell."""
    plt = _pyplot()
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    grid = np.full((len(metrics), len(kinds)), np.nan)
    sd = np.full_like(grid, np.nan)
    for r in rows:
        at = metrics.index(r["metric"]), kinds.index(r["kind"])
        grid[at] = np.nan if r["r2_test"] is None else r["r2_test"]
        sd[at] = np.nan if r.get("r2_test_sd") is None else r["r2_test_sd"]
    fig, ax = plt.subplots(figsize=(1.5 + 1.5 * len(kinds), 1.0 + 0.5 * len(metrics)))
    im = ax.imshow(np.clip(grid, -1, 1), cmap="RdYlGn", vmin=-1, vmax=1, aspect="auto")
    for i, j in np.ndindex(grid.shape):
        text = "—" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}" + ("" if np.isnan(sd[i, j]) else f"±{sd[i, j]:.2f}")
        ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_yticks(range(len(metrics)), metrics)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _save(plt, fig, path)


def plot_ablation_curve(
    curve: Sequence[tuple[int, float]],
    path: Path | str,
    *,
    clean: float | None = None,
    keep: float | None = None,
    variance_curve: Sequence[tuple[int, float]] | None = None,
    title: str = "return vs PCA subspace size",
) -> Path:
    """Return against subspace size ``k`` (the greedy curve), with the variance-ordered curve, the
    clean return and the ``keep`` bar when given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for pts, label, style in ((curve, "greedy by return", "o-"), (variance_curve, "variance order", "s--")):
        if pts:
            ks, rets = zip(*pts, strict=True)
            ax.plot(ks, rets, style, label=label if variance_curve is not None else "projected")
    if clean is not None:
        ax.axhline(clean, color="k", linestyle="--", label="clean")
        if keep is not None:
            ax.axhline(clean - (1.0 - keep) * abs(clean), color="r", linestyle=":", label=f"keep {keep:.0%}")
    ax.set_xlabel("k (PCA components kept)")
    ax.set_ylabel("mean return")
    ax.set_title(title)
    ax.legend()
    return _save(plt, fig, path)
