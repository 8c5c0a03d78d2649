"""Interrogating a policy's tap, rl_interrogate's protocol on an agent ``(module, make_env, act)``
(see :mod:`monitor.transcoders.splice`):

1. :func:`fit_probe`: does the tap encode a metric? Ridge, lasso or a small MLP, by held-out R².
The protocol's steps 2-4 are in :mod:`monitor.experiments.interrogate`.

2. :func:`~monitor.experiments.interrogate.polarity_inversion`: let the policy see the probed sensor negated; a probe of what the
   policy *sees* then loses its R² against the true value.
3. :func:`~monitor.experiments.interrogate.ablation_effect`: project the probe direction out of the tap; does the return drop more
   than for a random direction?
4. :func:`~monitor.experiments.interrogate.greedy_subspace`: the fewest top PCA components of the tap that keep the return.

Example::

    ro = collect(agent, "mlp_extractor.policy_net.0:out", episodes=5)
    probe = fit_probe(ro.X, ro.obs[:, 2], kind="ridge")   # CartPole's pole angle
    ablation_effect(agent, "mlp_extractor.policy_net.0:out", probe.direction, episodes=5)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent_side.taps import TapError, as_rows, parse_tap, resolve, tensor_hook
from monitor.transcoders.splice import Agent

__all__ = ["Rollouts", "collect", "Probe", "fit_probe", "r2_score", "probe_table", "plot_probe_heatmap"]

log = logging.getLogger(__name__)

KINDS = ("ridge", "lasso", "mlp")
RIDGE_ALPHAS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
LASSO_FRACTIONS = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)  # of the alpha that zeroes every weight
LASSO_R2_SLACK = 0.01  # lasso takes the sparsest alpha whose validation R² is within this of the best
SPLIT_BLOCKS = 10


@dataclass
class Rollouts:
    """One row per env step: the tap's activation ``X`` [n, d], the true observation ``obs`` [n, k]
    (before any ``obs_transform``), ``actions``, ``rewards``, the ``episode`` index of each row, and
    the ``returns`` of the episodes."""

    X: np.ndarray
    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    episode: np.ndarray
    returns: np.ndarray


@torch.no_grad()
def collect(
    agent: Agent, tap: str, *, episodes: int, seed: int = 0, obs_transform: Callable[[Any], Any] | None = None
) -> Rollouts:
    """Run the policy for ``episodes`` episodes (``env.reset(seed=seed + ep)``), recording the tap.

    The policy acts on ``obs_transform(obs)`` when given, while ``Rollouts.obs`` keeps the true
    observation. If ``act`` runs the tapped module more than once per step, the last call counts.
    """
    root, make_env, act = agent
    spec = parse_tap(tap)
    seen: list[torch.Tensor] = []

    def remember(t: torch.Tensor) -> None:
        seen.append(t.detach())

    handle = tensor_hook(resolve(root, spec), spec.site, remember)
    env = make_env()
    X, obs_rows, actions, rewards, ep_of, returns = [], [], [], [], [], []
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            done, ret = False, 0.0
            while not done:
                seen.clear()
                action = act(obs_transform(obs) if obs_transform is not None else obs)
                if not seen:
                    raise TapError(f"tap {tap} did not fire while the policy chose an action")
                rows, _ = as_rows(seen[-1])
                if rows.shape[0] != 1:
                    raise TapError(f"tap {tap} gave {rows.shape[0]} rows for one observation; collect needs one per step")
                X.append(rows[0].float().cpu().numpy())
                obs_rows.append(np.asarray(obs, dtype=np.float32).reshape(-1))
                actions.append(np.asarray(action))
                obs, r, term, trunc, _ = env.step(action)
                rewards.append(float(r))
                ep_of.append(ep)
                ret += float(r)
                done = term or trunc
            returns.append(ret)
    finally:
        handle.remove()
        env.close()
    return Rollouts(
        np.stack(X),
        np.stack(obs_rows),
        np.stack(actions),
        np.asarray(rewards, dtype=np.float32),
        np.asarray(ep_of, dtype=np.int64),
        np.asarray(returns, dtype=np.float64),
    )


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    """``1 - SS_res / SS_tot`` about ``y``'s own mean; negative when worse than the mean; nan if ``y`` is constant."""
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / tot if tot > 0 else float("nan")


@dataclass
class Probe:
    """A fitted probe. ``direction`` is the unit weight vector in the tap's own (unstandardized)
    space for the linear kinds (None for mlp, or when lasso zeroes every weight)."""

    kind: str
    r2_train: float
    r2_test: float
    n_nonzero: int
    direction: np.ndarray | None
    alpha: float | None
    _fn: Callable[[np.ndarray], np.ndarray] = field(repr=False, compare=False)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self._fn(np.asarray(X, dtype=np.float64))


def _block_split(n: int, frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows cut into SPLIT_BLOCKS contiguous blocks of steps; a random ``frac`` of the blocks is held out.

    Whole blocks, not single rows: neighbouring steps of an episode are nearly identical, so a
    row-wise split would leak them across the split and flatter the probe.
    """
    edges = np.linspace(0, n, SPLIT_BLOCKS + 1).astype(int)
    held = rng.choice(SPLIT_BLOCKS, max(1, round(frac * SPLIT_BLOCKS)), replace=False)
    mask = np.zeros(n, dtype=bool)
    for b in held:
        mask[edges[b] : edges[b + 1]] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _scale(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations (1 where a column is constant)."""
    sd = X.std(0)
    return X.mean(0), np.where(sd < 1e-12, 1.0, sd)


def _lasso_cd(G: np.ndarray, c: np.ndarray, alpha: float, w: np.ndarray, *, sweeps: int = 1000, tol: float = 1e-8) -> np.ndarray:
    """Coordinate descent on ``(1/2n)|y - Xw|² + alpha|w|_1`` from the Gram form ``G = X^TX/n``, ``c = X^Ty/n``."""
    w = w.copy()
    diag = np.diag(G)
    for _ in range(sweeps):
        biggest = 0.0
        for j in np.flatnonzero(diag > 0):
            rho = c[j] - G[j] @ w + diag[j] * w[j]
            new = np.sign(rho) * max(abs(rho) - alpha, 0.0) / diag[j]
            biggest = max(biggest, abs(new - w[j]))
            w[j] = new
        if biggest < tol:
            break
    return w


def _fit_linear(kind: str, Xs: np.ndarray, yc: np.ndarray, alpha: float, w0: np.ndarray | None = None) -> np.ndarray:
    n, d = Xs.shape
    G, c = Xs.T @ Xs / n, Xs.T @ yc / n
    if kind == "ridge":
        return np.linalg.solve(G + alpha * np.eye(d), c)
    return _lasso_cd(G, c, alpha, np.zeros(d) if w0 is None else w0)


def _linear_probe(
    kind: str, X: np.ndarray, y: np.ndarray, tr: np.ndarray, rng: np.random.Generator, alpha: float | None
) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray, float]:
    mu, sd = _scale(X[tr])
    Xs, ym = (X - mu) / sd, y[tr].mean()
    if alpha is None:  # choose on a validation split carved out of the training rows
        fit, val = _block_split(len(tr), 0.25, rng)
        fit, val = tr[fit], tr[val]
        if kind == "ridge":
            grid = list(RIDGE_ALPHAS)
        else:
            top = float(np.abs(Xs[fit].T @ (y[fit] - y[fit].mean())).max()) / len(fit)
            grid = [top * f for f in LASSO_FRACTIONS] if top > 0 else [1.0]
        scores, w = [], None
        for a in grid:  # lasso: largest alpha first, each fit warm-starting the next
            w = _fit_linear(kind, Xs[fit], y[fit] - y[fit].mean(), a, w)
            scores.append(r2_score(y[val], Xs[val] @ w + y[fit].mean()))
        scores = np.nan_to_num(np.asarray(scores), nan=-np.inf)
        ok = scores >= scores.max() - (LASSO_R2_SLACK if kind == "lasso" else 0.0)
        alpha = grid[int(np.flatnonzero(ok)[0])]
    w = _fit_linear(kind, Xs[tr], y[tr] - ym, alpha)
    coef = w / sd
    intercept = ym - float(mu @ coef)
    return (lambda Z: Z @ coef + intercept), coef, float(alpha)


def _mlp_probe(
    X: np.ndarray,
    y: np.ndarray,
    tr: np.ndarray,
    rng: np.random.Generator,
    seed: int,
    *,
    hidden: int = 64,
    max_epochs: int = 200,
    patience: int = 20,
    batch: int = 256,
    lr: float = 1e-2,
) -> Callable[[np.ndarray], np.ndarray]:
    fit, val = _block_split(len(tr), 0.25, rng)
    fit, val = tr[fit], tr[val]
    mu, sd = _scale(X[fit])
    ym, ysd = y[fit].mean(), max(float(y[fit].std()), 1e-12)
    xt = torch.as_tensor((X - mu) / sd, dtype=torch.float32)
    yt = torch.as_tensor((y - ym) / ysd, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    fit_t, val_t = torch.as_tensor(fit), torch.as_tensor(val)
    best, best_state, stale = float("inf"), None, 0
    for _ in range(max_epochs):
        order = fit_t[torch.randperm(len(fit_t), generator=g)]
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            loss = torch.mean((net(xt[idx]).squeeze(-1) - yt[idx]) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            vloss = float(torch.mean((net(xt[val_t]).squeeze(-1) - yt[val_t]) ** 2))
        if vloss < best - 1e-9:
            best, best_state, stale = vloss, {k: v.clone() for k, v in net.state_dict().items()}, 0
        else:
            stale += 1
            if stale >= patience:
                break
    if best_state is not None:  # None only if every validation loss was nan
        net.load_state_dict(best_state)
    net.eval()

    @torch.no_grad()
    def predict(Z: np.ndarray) -> np.ndarray:
        out = net(torch.as_tensor((Z - mu) / sd, dtype=torch.float32)).squeeze(-1).double().numpy()
        return out * ysd + ym

    return predict


def fit_probe(
    X: np.ndarray, y: np.ndarray, *, kind: str = "ridge", test_frac: float = 0.2, seed: int = 0, alpha: float | None = None
) -> Probe:
    """Fit a probe from activation rows ``X`` [n, d] to a metric ``y`` [n]; judged on held-out rows.

    The test rows are whole contiguous blocks of steps (see ``_block_split``), so rows in time
    order (as :func:`collect` gives them) are split honestly. ``alpha`` None picks it on a
    validation split of the training rows: ridge by best R², lasso by the largest alpha within
    0.01 R² of the best (the sparsest nearly-as-good probe). Deterministic for a ``seed``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64).reshape(-1)
    if X.ndim != 2 or len(X) != len(y) or len(X) < 2 * SPLIT_BLOCKS:
        raise ValueError(f"need X [n, d] and y [n] with n >= {2 * SPLIT_BLOCKS}, got X {X.shape} and y {y.shape}")
    rng = np.random.default_rng(seed)
    tr, te = _block_split(len(X), test_frac, rng)
    if kind == "mlp":
        fn, direction, n_nonzero = _mlp_probe(X, y, tr, rng, seed), None, X.shape[1]
    else:
        fn, coef, alpha = _linear_probe(kind, X, y, tr, rng, alpha)
        n_nonzero = int(np.count_nonzero(coef)) if kind == "lasso" else X.shape[1]
        norm = float(np.linalg.norm(coef))
        direction = (coef / norm).astype(np.float32) if norm > 0 else None
    return Probe(
        kind, r2_score(y[tr], fn(X[tr])), r2_score(y[te], fn(X[te])), n_nonzero, direction, None if kind == "mlp" else alpha, fn
    )


def probe_table(
    X: np.ndarray, metrics: dict[str, np.ndarray], *, kinds: Sequence[str] = KINDS, test_frac: float = 0.2, seed: int = 0
) -> list[dict[str, Any]]:
    """One row per (metric, probe kind): ``metric, kind, r2_train, r2_test, n_nonzero, alpha``."""
    rows = []
    for name, y in metrics.items():
        for kind in kinds:
            p = fit_probe(X, y, kind=kind, test_frac=test_frac, seed=seed)
            rows.append(
                {
                    "metric": name,
                    "kind": kind,
                    "r2_train": p.r2_train,
                    "r2_test": p.r2_test,
                    "n_nonzero": p.n_nonzero,
                    "alpha": p.alpha,
                }
            )
            log.info("probe %s/%s: held-out R² %.3f", name, kind, p.r2_test)
    return rows


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
    """Metrics × probe kinds, coloured by held-out R² with the value written in each cell."""
    plt = _pyplot()
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    grid = np.full((len(metrics), len(kinds)), np.nan)
    for r in rows:
        grid[metrics.index(r["metric"]), kinds.index(r["kind"])] = r["r2_test"]
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(kinds), 1.0 + 0.5 * len(metrics)))
    im = ax.imshow(np.clip(grid, -1, 1), cmap="RdYlGn", vmin=-1, vmax=1, aspect="auto")
    for i, j in np.ndindex(grid.shape):
        ax.text(j, i, "—" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_yticks(range(len(metrics)), metrics)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _save(plt, fig, path)
