"""Interrogating a policy's tap, rl_interrogate's protocol on an agent ``(module, make_env, act)``
(see :mod:`monitor.experiments.agents`):

1. :func:`cross_validate` (and :func:`fit_probe`): does the tap encode a metric? Ridge, lasso or
   a small MLP, by held-out R², mean ± sd over folds of contiguous blocks of steps.

The protocol's steps 2-4 are in :mod:`monitor.experiments.interrogate` and
:mod:`monitor.experiments.subspace`:

2. :func:`~monitor.experiments.interrogate.polarity_inversion`: let the policy see the probed
   sensor negated; a probe of what the policy *sees* then loses its R² against the true value.
3. :func:`~monitor.experiments.interrogate.ablation_effect`: zero- or mean-ablate the probe
   direction in the tap; does the return drop more than for random directions?
4. :func:`~monitor.experiments.subspace.greedy_subspace`: the fewest PCA components of the tap,
   chosen greedily by the return they keep, that keep the return.

Example::

    ro = collect(agent, "mlp_extractor.policy_net.0:out", episodes=20)
    cv = cross_validate(ro.X, ro.obs[:, 2], kind="ridge")   # CartPole's pole angle
    cv.r2_mean, cv.r2_sd                                     # over 5 folds
    probe = fit_probe(ro.X, ro.obs[:, 2], kind="ridge")
    ablation_effect(agent, "mlp_extractor.policy_net.0:out", probe.direction, X=ro.X, episodes=20)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agent_side.taps import TapError, as_rows, parse_tap, resolve, tensor_hook
from monitor.experiments.agents import as_agent
from monitor.experiments.plots import plot_probe_heatmap
from monitor.transcoders.splice import Agent

__all__ = [
    "Rollouts",
    "collect",
    "first_step",
    "Probe",
    "fit_probe",
    "CrossValidated",
    "cross_validate",
    "r2_score",
    "probe_table",
    "plot_probe_heatmap",
]

log = logging.getLogger(__name__)

KINDS = ("ridge", "lasso", "mlp")
RIDGE_ALPHAS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
LASSO_FRACTIONS = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)  # of the alpha that zeroes every weight
LASSO_R2_SLACK = 0.01  # lasso takes the sparsest alpha whose validation R² is within this of the best
SPLIT_BLOCKS = 10
FOLDS = 5  # cross_validate's default: each fifth of the steps, in time order, held out once


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

    As in :func:`~monitor.experiments.episodes.run_episodes` torch's RNG is seeded per episode and
    an agent's ``reset()`` runs before each, so the same seeds give the same episodes there and
    here. The policy acts on ``obs_transform(obs)`` when given, while ``Rollouts.obs`` keeps the
    true observation. If ``act`` runs the tapped module more than once per step, the last call counts.
    """
    root, make_env, act = as_agent(agent)
    spec = parse_tap(tap)
    seen: list[torch.Tensor] = []

    def remember(t: torch.Tensor) -> None:
        seen.append(t.detach())

    handle = tensor_hook(resolve(root, spec), spec.site, remember)
    env = make_env()
    X, obs_rows, actions, rewards, ep_of, returns = [], [], [], [], [], []
    try:
        with torch.random.fork_rng(devices=[]):
            for ep in range(episodes):
                torch.manual_seed(seed + ep)
                obs, _ = env.reset(seed=seed + ep)
                done, ret = False, 0.0
                while not done:
                    seen.clear()
                    action = act(obs_transform(obs) if obs_transform is not None else obs)
                    X.append(_one_row(tap, seen))
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


def _one_row(tap: str, seen: list[torch.Tensor]) -> np.ndarray:
    """The tap's row for this step: the last value it saw, which must be one row."""
    if not seen:
        raise TapError(f"tap {tap} did not fire while the policy chose an action")
    rows, _ = as_rows(seen[-1])
    if rows.shape[0] != 1:
        raise TapError(f"tap {tap} gave {rows.shape[0]} rows for one observation; probes need one per step")
    return rows[0].float().cpu().numpy()


@torch.no_grad()
def first_step(agent: Agent, tap: str, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The observation of ``env.reset(seed=seed)`` and the tap's rows [r, width] as the policy
    acts on it once (:func:`collect` and the probes need r = 1).

    Checks a tap before any episode: a :class:`~agent_side.taps.TapError` for a module that does
    not exist (with close matches) or a tap that does not fire. Steers active around the call
    apply, so their width checks run here too. The next episode starts afresh only for an agent
    with a ``reset()``; a recurrent one without it is one step further on.
    """
    root, make_env, act = as_agent(agent)
    if root is None:
        raise TapError(f"the agent has no module to tap {tap} in")
    spec = parse_tap(tap)
    seen: list[torch.Tensor] = []
    handle = tensor_hook(resolve(root, spec), spec.site, lambda t: seen.append(t.detach()))
    env = make_env()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            obs, _ = env.reset(seed=seed)
            act(obs)
        if not seen:
            raise TapError(f"tap {tap} did not fire while the policy chose an action")
        return np.asarray(obs, dtype=np.float32).reshape(-1), as_rows(seen[-1])[0].float().cpu().numpy()
    finally:
        handle.remove()
        env.close()


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


def _checked(kind: str, X: np.ndarray, y: np.ndarray, n_min: int) -> tuple[np.ndarray, np.ndarray]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64).reshape(-1)
    if X.ndim != 2 or len(X) != len(y) or len(X) < n_min:
        raise ValueError(f"need X [n, d] and y [n] with n >= {n_min}, got X {X.shape} and y {y.shape}")
    return X, y


def _fit(
    kind: str,
    X: np.ndarray,
    y: np.ndarray,
    tr: np.ndarray,
    te: np.ndarray,
    rng: np.random.Generator,
    seed: int,
    alpha: float | None,
) -> Probe:
    """A probe fitted on rows ``tr`` (hyperparameters on a validation split of them), judged on ``te``."""
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


def fit_probe(
    X: np.ndarray, y: np.ndarray, *, kind: str = "ridge", test_frac: float = 0.2, seed: int = 0, alpha: float | None = None
) -> Probe:
    """Fit a probe from activation rows ``X`` [n, d] to a metric ``y`` [n]; judged on held-out rows.

    The test rows are whole contiguous blocks of steps (see ``_block_split``), so rows in time
    order (as :func:`collect` gives them) are split honestly. ``alpha`` None picks it on a
    validation split of the training rows: ridge by best R², lasso by the largest alpha within
    0.01 R² of the best (the sparsest nearly-as-good probe). Deterministic for a ``seed``. One
    split's R² can swing widely for a weakly carried metric: :func:`cross_validate` says how much.
    """
    X, y = _checked(kind, X, y, 2 * SPLIT_BLOCKS)
    rng = np.random.default_rng(seed)
    tr, te = _block_split(len(X), test_frac, rng)
    return _fit(kind, X, y, tr, te, rng, seed, alpha)


@dataclass
class CrossValidated:
    """A probe kind judged by ``folds``-fold cross-validation over contiguous blocks of steps: the
    rows cut into ``folds`` blocks in time order, each held out once from a probe fitted on the
    rest. ``probes`` are the fold probes, fold ``i`` held out block ``i``."""

    kind: str
    folds: int
    probes: list[Probe]

    @property
    def r2_test(self) -> np.ndarray:
        return np.array([p.r2_test for p in self.probes])

    @property
    def r2_mean(self) -> float:
        r = self.r2_test[np.isfinite(self.r2_test)]
        return float(r.mean()) if r.size else float("nan")

    @property
    def r2_sd(self) -> float:
        """The sample sd of the folds' held-out R² (ddof 1): how much one split could have said otherwise."""
        r = self.r2_test[np.isfinite(self.r2_test)]
        return float(r.std(ddof=1)) if r.size > 1 else float("nan")

    def r2_on(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Each fold probe's R² on other rows (another condition's rollouts)."""
        return np.array([r2_score(y, p.predict(X)) for p in self.probes])


def cross_validate(
    X: np.ndarray, y: np.ndarray, *, kind: str = "ridge", folds: int = FOLDS, seed: int = 0, alpha: float | None = None
) -> CrossValidated:
    """:func:`fit_probe`'s probe, ``folds`` times: fold ``i`` holds out the ``i``-th contiguous
    block of rows (rows in time order, as :func:`collect` gives them) and fits on the others.

    The spread of the folds' held-out R² is the probe's uncertainty: a weakly carried metric that
    one seeded split scores 0.57 may score -6 on another block. Deterministic for a ``seed``.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    X, y = _checked(kind, X, y, max(2 * SPLIT_BLOCKS, folds * 4))
    edges = np.linspace(0, len(X), folds + 1).astype(int)
    rows = np.arange(len(X))
    probes = []
    for i in range(folds):
        held = (rows >= edges[i]) & (rows < edges[i + 1])
        rng = np.random.default_rng([seed, i])
        probes.append(_fit(kind, X, y, rows[~held], rows[held], rng, seed, alpha))
    return CrossValidated(kind, folds, probes)


def probe_table(
    X: np.ndarray,
    metrics: dict[str, np.ndarray],
    *,
    kinds: Sequence[str] = KINDS,
    folds: int = FOLDS,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (metric, probe kind), by :func:`cross_validate`: ``metric, kind, folds``,
    ``r2_test`` (the mean held-out R² over the folds) with ``r2_test_sd`` and ``r2_test_folds``,
    ``r2_train`` (the mean over the folds), ``n_nonzero`` and ``alpha`` (medians over the folds;
    alpha None for mlp)."""
    rows = []
    for name, y in metrics.items():
        for kind in kinds:
            cv = cross_validate(X, y, kind=kind, folds=folds, seed=seed)
            alphas = [p.alpha for p in cv.probes if p.alpha is not None]
            rows.append(
                {
                    "metric": name,
                    "kind": kind,
                    "folds": folds,
                    "r2_train": float(np.nanmean([p.r2_train for p in cv.probes])),
                    "r2_test": cv.r2_mean,
                    "r2_test_sd": cv.r2_sd,
                    "r2_test_folds": [float(r) for r in cv.r2_test],
                    "n_nonzero": int(np.median([p.n_nonzero for p in cv.probes])),
                    "alpha": float(np.median(alphas)) if alphas else None,
                }
            )
            log.info("probe %s/%s: held-out R² %.3f ± %.3f over %d folds", name, kind, cv.r2_mean, cv.r2_sd, folds)
    return rows
