"""Cross-policy concept comparison: which latents two transcoders (two policies, or two checkpoints
of one) share, and which each has alone.

Two ways to say two latents are the same concept:

- ``by="decoder"``: the cosine of their decoder rows (``W_dec[i]``). Meaningful only when both
  transcoders write into the same space: checkpoints of one run, or a shared space such as the
  action logits. Two independently trained policies' hidden layers have unrelated bases, so their
  decoder cosines say nothing.
- ``by="activation"``: the correlation of the latents' activations on the same states (``Xa`` and
  ``Xb`` are policy A's and policy B's source-tap rows for the same observations). This works
  across unrelated bases.

Latents are paired one-to-one by the assignment maximizing the total score (Hungarian, via
``scipy.optimize.linear_sum_assignment``; greedy best-pair-first when scipy is missing or asked
for); a pair scoring at least ``threshold`` is shared, every other latent is unique to its side.
The result is plain JSON-serializable data.

Example::

    result = match_latents(tc_a, tc_b, Xa=acts_a, Xb=acts_b, by="activation")
    Path("compare.md").write_text(compare_report(result, explanations_a=ex_a, explanations_b=ex_b))
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from monitor.transcoders.model import Transcoder

__all__ = ["match_latents", "compare_report"]

log = logging.getLogger(__name__)

BY = ("decoder", "activation")
METHODS = ("auto", "hungarian", "greedy")


def _unit_rows(W: torch.Tensor) -> np.ndarray:
    w = W.detach().cpu().double().numpy()
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


@torch.no_grad()
def _latents(model: Transcoder, X: Any) -> np.ndarray:
    return model.encode(torch.as_tensor(np.asarray(X, dtype=np.float32))).double().numpy()


def _correlation(Za: np.ndarray, Zb: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of ``Za`` with every column of ``Zb``; nan where a column is constant."""
    a, b = Za - Za.mean(0), Zb - Zb.mean(0)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (a.T @ b) / np.outer(na, nb)


def _assign(score: np.ndarray, method: str) -> list[tuple[int, int]]:
    """One-to-one pairs (row, column) of ``score`` [na, nb], maximizing the total (hungarian) or taking
    the best remaining pair first (greedy: can miss the optimum, e.g. [[.9, .8], [.85, .1]])."""
    if method == "hungarian":
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(score, maximize=True)
        return [(int(i), int(j)) for i, j in zip(rows, cols, strict=True)]
    used_a, used_b, pairs = set(), set(), []
    for flat in np.argsort(-score, axis=None, kind="stable"):
        i, j = divmod(int(flat), score.shape[1])
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
    return pairs


def _method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "greedy":
        return method
    try:
        import scipy.optimize  # noqa: F401
    except ImportError as e:
        if method == "hungarian":
            raise ValueError("method='hungarian' needs scipy; use method='greedy'") from e
        log.info("scipy is not installed: matching latents greedily")
        return "greedy"
    return "hungarian"


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 6)


def match_latents(
    a: Transcoder,
    b: Transcoder,
    *,
    Xa: Any = None,
    Xb: Any = None,
    threshold: float = 0.5,
    by: str = "decoder",
    method: str = "auto",
) -> dict[str, Any]:
    """Pair the latents of ``a`` and ``b`` and sort them into shared and unique.

    Every pair reports its decoder ``cosine`` (None when the output widths differ) and, given
    ``Xa`` and ``Xb``, the ``act_corr`` of its activations (None for a latent that never varies
    there). ``by`` picks which of the two the assignment and ``threshold`` use. Unique latents
    come with their ``nearest`` latent on the other side and its score. Given activations, the
    latents that never fire on them are listed as ``dead_a`` / ``dead_b``.
    """
    if by not in BY:
        raise ValueError(f"by must be one of {BY}, got {by!r}")
    if (Xa is None) != (Xb is None):
        raise ValueError("give both Xa and Xb (activations of A and B on the same states) or neither")
    same_space = a.d_out == b.d_out
    if by == "decoder" and not same_space:
        raise ValueError(f"decoder cosine needs the same output width, got {a.d_out} and {b.d_out}; use by='activation'")
    if by == "activation" and Xa is None:
        raise ValueError("by='activation' needs Xa and Xb")
    cos = _unit_rows(a.W_dec) @ _unit_rows(b.W_dec).T if same_space else None
    corr = dead_a = dead_b = None
    if Xa is not None:
        if len(Xa) != len(Xb):
            raise ValueError(f"Xa and Xb must hold the same states, got {len(Xa)} and {len(Xb)} rows")
        Za, Zb = _latents(a, Xa), _latents(b, Xb)
        corr = _correlation(Za, Zb)
        dead_a = np.flatnonzero(~(Za > 0).any(0)).tolist()
        dead_b = np.flatnonzero(~(Zb > 0).any(0)).tolist()
    score = np.nan_to_num(cos if by == "decoder" else corr, nan=0.0)
    method = _method(method)
    pairs = []
    for i, j in _assign(score, method):
        pairs.append(
            {
                "a": i,
                "b": j,
                "score": _num(score[i, j]),
                "shared": bool(score[i, j] >= threshold),
                "cosine": None if cos is None else _num(cos[i, j]),
                "act_corr": None if corr is None else _num(corr[i, j]),
            }
        )
    pairs.sort(key=lambda p: -p["score"])
    shared = [p for p in pairs if p["shared"]]
    in_a, in_b = {p["a"] for p in shared}, {p["b"] for p in shared}

    def unique(n: int, taken: set[int], s: np.ndarray) -> list[dict[str, Any]]:
        return [
            {
                "latent": i,
                "nearest": int(np.argmax(s[i])) if s.shape[1] else None,
                "score": _num(s[i].max()) if s.shape[1] else None,
            }
            for i in range(n)
            if i not in taken
        ]

    out = {
        "by": by,
        "method": method,
        "threshold": threshold,
        "n_a": a.d_sae,
        "n_b": b.d_sae,
        "pairs": pairs,
        "shared": shared,
        "unique_a": unique(a.d_sae, in_a, score),
        "unique_b": unique(b.d_sae, in_b, score.T),
    }
    if corr is not None:
        out.update(dead_a=dead_a, dead_b=dead_b)
    log.info(
        "matched latents by %s: %d shared, %d unique to A, %d unique to B",
        by,
        len(shared),
        len(out["unique_a"]),
        len(out["unique_b"]),
    )
    return out


def _explain(explanations: dict[Any, str] | None, i: int) -> str:
    """The explanation of latent ``i`` (int or, as after a JSON round trip, str keys), made table-safe."""
    if not explanations:
        return ""
    text = explanations.get(i, explanations.get(str(i), ""))
    return " ".join(str(text).split()).replace("|", "\\|")


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def compare_report(
    result: dict[str, Any],
    *,
    explanations_a: dict[int, str] | None = None,
    explanations_b: dict[int, str] | None = None,
    name_a: str = "A",
    name_b: str = "B",
) -> str:
    """A markdown report of :func:`match_latents`'s result: shared latents side by side, then each
    side's unique latents, with their explanations when given."""
    score_name = "decoder cosine" if result["by"] == "decoder" else "activation correlation"
    lines = [
        f"# Latents of {name_a} and {name_b}",
        "",
        f"Matched one-to-one by {score_name} ({result['method']} assignment), shared at ≥ {result['threshold']}: "
        f"{len(result['shared'])} shared, {len(result['unique_a'])} of {result['n_a']} unique to {name_a}, "
        f"{len(result['unique_b'])} of {result['n_b']} unique to {name_b}.",
        "",
        f"## Shared ({len(result['shared'])})",
        "",
    ]
    if result["shared"]:
        lines += [
            f"| {name_a} latent | {name_b} latent | cosine | act. corr | {name_a} explanation | {name_b} explanation |",
            "|---:|---:|---:|---:|---|---|",
        ]
        lines += [
            f"| {p['a']} | {p['b']} | {_fmt(p['cosine'])} | {_fmt(p['act_corr'])} | "
            f"{_explain(explanations_a, p['a'])} | {_explain(explanations_b, p['b'])} |"
            for p in result["shared"]
        ]
    else:
        lines.append("None.")
    for side, other, key, ex in ((name_a, name_b, "unique_a", explanations_a), (name_b, name_a, "unique_b", explanations_b)):
        lines += ["", f"## Unique to {side} ({len(result[key])})", ""]
        if not result[key]:
            lines.append("None.")
            continue
        lines += [f"| {side} latent | nearest {other} latent | {score_name} | explanation |", "|---:|---:|---:|---|"]
        lines += [
            f"| {u['latent']} | {'—' if u['nearest'] is None else u['nearest']} | {_fmt(u['score'])} | "
            f"{_explain(ex, u['latent'])} |"
            for u in result[key]
        ]
    for side, key in ((name_a, "dead_a"), (name_b, "dead_b")):
        if result.get(key):
            lines += ["", f"Never active on the given states in {side}: {', '.join(map(str, result[key]))}."]
    return "\n".join(lines) + "\n"
