"""Conditions: the machine-readable claims of an explanation, and how to read them from text.

A condition is ``{"metric": M, "op": OP, "value": V}`` with OP one of ``>``, ``<`` (the metric
above or below V) or ``abs>``, ``abs<`` (its magnitude above or below V), or, on a
language-model tap, ``{"tokens": [...]}``. An explanation's conditions all hold at once (AND).

:func:`conditions_from_text` reads them from prose the way a careful reader would: metric names
match on word boundaries and in natural forms ("pole angle" and "angle" for ``pole_angle``,
"angular velocity" for ``pole_angular_velocity``, not "action" inside "fraction"); a name
preceded or followed in its clause by a negation ("not related to cart velocity", "regardless
of cart_pos", "cart_vel does not matter") is no claim; the direction comes from the words of
its clause ("high", "below", "increasing", "|x|", "in either direction"); a number after a
comparison word is the threshold."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Reference", "predict", "soft", "conditions_from_text", "metric_forms", "describe"]

_EXPAND = {
    "vel": "velocity",
    "pos": "position",
    "ang": "angular",
    "acc": "acceleration",
    "accel": "acceleration",
    "rot": "rotation",
    "dist": "distance",
    "angvel": "angular velocity",
    "theta": "angle",
}
_UP = {
    "high", "higher", "highest", "large", "larger", "largest", "big", "bigger", "positive", "increasing", "increases",
    "increase", "above", "greater", "more", "exceeds", "exceeding", "over", "maximum", "max", "right", "rightward",
    "rightwards", "fast", "faster", "peak", "peaks",
}  # fmt: skip
_DOWN = {
    "low", "lower", "lowest", "small", "smaller", "smallest", "negative", "decreasing", "decreases", "decrease", "below",
    "less", "fewer", "under", "minimum", "min", "left", "leftward", "leftwards", "slow", "slower",
}  # fmt: skip
_NEG = {
    "not", "no", "never", "nor", "neither", "unrelated", "independent", "independently", "regardless", "irrespective",
    "without", "nothing", "irrelevant", "rather", "instead", "except", "isn", "doesn", "don", "aren", "didn", "unaffected",
}  # fmt: skip
_ABS = {"absolute", "magnitude", "either"}  # and "far from", "both directions" (see _direction)
_NEAR = {"near", "close", "around", "upright", "centered", "centred"}
_CLAUSE = {"and", "but", "while", "whereas", "or", "although", "though", "however", "yet", "unlike"}
_GT, _LT = {">", ">=", "above", "over", "exceeds", "exceeding", "greater", "more"}, {"<", "<=", "below", "under", "less"}
_TOKEN = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:e[-+]?\d+)?|[a-z]+|[<>]=?|\||[.;:,!?()]")
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:e[-+]?\d+)?$")


def _words(name: str) -> list[str]:
    """A metric name as words: split at ``_``, ``.``, ``-``, digits and camelCase; short forms
    expanded (``vel`` -> velocity)."""
    name = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    out: list[str] = []
    for w in re.findall(r"[a-zA-Z]+", name):
        out += _EXPAND.get(w.lower(), w.lower()).split()
    return out


def _stem(w: str) -> str:
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def metric_forms(metrics: list[str]) -> dict[tuple[str, ...], str]:
    """Word sequences that name one metric only: its whole name, and every run of its words that
    no other metric's name contains (single words of three letters or fewer only as the whole name)."""
    words = {m: tuple(_stem(w) for w in _words(m)) for m in metrics}
    subs: dict[tuple[str, ...], set[str]] = {}
    for m, ws in words.items():
        for i in range(len(ws)):
            for j in range(i + 1, len(ws) + 1):
                subs.setdefault(ws[i:j], set()).add(m)
    forms = {ws: next(iter(ms)) for ws, ms in subs.items() if len(ms) == 1 and (len(ws) > 1 or len(ws[0]) > 3)}
    for m, ws in words.items():
        if ws and sum(1 for o in words.values() if o == ws) == 1:
            forms[ws] = m
    return forms


def _clauses(text: str) -> list[list[list[str]]]:
    """Sentences, each a list of clauses, each a list of tokens (lower case, ``_`` as a space)."""
    toks = _TOKEN.findall(text.lower().replace("_", " ").replace("'", " "))
    sentences: list[list[list[str]]] = [[[]]]
    for t in toks:
        if t in {".", "!", "?", ";"} and not sentences[-1][-1] == []:
            sentences.append([[]])
        elif t in {",", ":", "(", ")"} or t in _CLAUSE:
            if sentences[-1][-1]:
                sentences[-1].append([])
        elif t not in {".", "!", "?", ";"}:
            sentences[-1][-1].append(t)
    return [[c for c in s if c] for s in sentences if any(s)]


def _direction(clause: list[str]) -> str | None:
    up, down = any(w in _UP for w in clause), any(w in _DOWN for w in clause)
    pairs = set(zip(clause, clause[1:], strict=False))
    both = any(("both", w) in pairs for w in ("directions", "direction", "sides", "side", "ways"))
    if "|" in clause or both or ("far", "from") in pairs or any(w in _ABS for w in clause):
        return "abs<" if any(w in _NEAR for w in clause) or (down and not up) else "abs>"
    if any(w in _NEAR for w in clause) and ("zero" in clause or "center" in clause or "centre" in clause):
        return "abs<"
    return ">" if up and not down else "<" if down and not up else None


def _number(clause: list[str], after: int) -> tuple[str, float] | None:
    for k in range(after, len(clause) - 1):
        if clause[k] in _GT | _LT:
            for t in clause[k + 1 : k + 4]:
                if _NUMBER.match(t):
                    return (">" if clause[k] in _GT else "<"), float(t)
    return None


@dataclass
class Reference:
    """Where a threshold comes from when the text gives no number: rows the explainer saw, and
    which of them activate. The threshold sits halfway between the metric's mean where the latent
    activates and its median over all these rows; an unstated direction is the correlation's sign."""

    names: list[str]
    metrics: np.ndarray  # [n, len(names)]
    active: np.ndarray  # [n] bool

    def column(self, metric: str, op: str) -> np.ndarray:
        col = self.metrics[:, self.names.index(metric)].astype(np.float64)
        return np.abs(col) if op.startswith("abs") else col

    def sign(self, metric: str) -> str | None:
        col, a = self.column(metric, ">"), self.active.astype(np.float64)
        if len(col) < 3 or np.std(col) < 1e-12 or np.std(a) < 1e-12:
            return None
        return ">" if np.corrcoef(col, a)[0, 1] >= 0 else "<"

    def threshold(self, metric: str, op: str) -> float | None:
        col = self.column(metric, op)
        if not self.active.any() or len(col) == 0:
            return None
        return (float(np.mean(col[self.active])) + float(np.median(col))) / 2


def conditions_from_text(text: str, metrics: list[str], ref: Reference | None = None) -> list[dict[str, Any]]:
    """The conditions prose states about ``metrics``, in the order it names them; where it gives
    no number the threshold (and an unstated direction) come from ``ref``."""
    forms = metric_forms(metrics)
    longest = max((len(f) for f in forms), default=0)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for sentence in _clauses(text):
        dirs = [_direction(c) for c in sentence]
        for ci, clause in enumerate(sentence):
            if any(w in _NEG for w in clause):
                continue  # "not related to X", "X does not matter": no claim about X
            stems = [_stem(w) for w in clause]
            i = 0
            while i < len(stems):
                n = next((n for n in range(min(longest, len(stems) - i), 0, -1) if tuple(stems[i : i + n]) in forms), 0)
                if not n:
                    i += 1
                    continue
                m = forms[tuple(stems[i : i + n])]
                i += n
                if m in seen:
                    continue
                # a clause with no direction word shares the direction of the next (or previous) one:
                # "when the pole angle and the angular velocity are both high"
                d = dirs[ci] or next((x for x in dirs[ci + 1 :] if x), None) or next((x for x in dirs[:ci][::-1] if x), None)
                num = _number(clause, i)
                value: float | None
                if num is not None:
                    op = ("abs" + num[0]) if d in ("abs>", "abs<") else num[0]
                    value = abs(num[1]) if op.startswith("abs") else num[1]
                else:
                    op = d or (ref.sign(m) if ref is not None else None) or ""
                    value = ref.threshold(m, op) if ref is not None and op else None
                if value is None:
                    continue
                seen.add(m)
                out.append({"metric": m, "op": op, "value": round(float(value), 6)})
    return out


def _column(c: dict[str, Any], metric_names: list[str], metrics: np.ndarray) -> np.ndarray:
    col = metrics[:, metric_names.index(c["metric"])].astype(np.float64)
    return np.abs(col) if c["op"].startswith("abs") else col


def _tokens_hit(c: dict[str, Any], n: int, tokens: list[str] | None) -> np.ndarray:
    return np.isin(np.asarray(tokens if tokens is not None else [""] * n, dtype=object), list(c["tokens"]))


def predict(
    conditions: list[dict[str, Any]], metric_names: list[str], metrics: np.ndarray, tokens: list[str] | None = None
) -> np.ndarray:
    """Rows where all the conditions hold."""
    pred = np.ones(len(metrics), dtype=bool)
    for c in conditions:
        if "tokens" in c:
            pred &= _tokens_hit(c, len(metrics), tokens)
            continue
        col = _column(c, metric_names, metrics)
        pred &= col > c["value"] if c["op"].endswith(">") else col < c["value"]
    return pred


def soft(
    conditions: list[dict[str, Any]],
    metric_names: list[str],
    metrics: np.ndarray,
    tokens: list[str] | None = None,
    *,
    sharpness: float = 4.0,
    spread: dict[str, float] | None = None,
) -> np.ndarray:
    """A graded :func:`predict` in [0, 1]: each threshold a logistic of its margin in units of the
    metric's spread (``spread[metric]``, else the rows' own), multiplied across conditions."""
    sim = np.ones(len(metrics))
    for c in conditions:
        if "tokens" in c:
            sim *= _tokens_hit(c, len(metrics), tokens)
            continue
        col = _column(c, metric_names, metrics)
        sd = (spread or {}).get(c["metric"]) or float(np.std(col)) or 1.0
        margin = (col - c["value"]) / sd * (1.0 if c["op"].endswith(">") else -1.0)
        sim *= 1.0 / (1.0 + np.exp(-np.clip(sharpness * margin, -50.0, 50.0)))
    return sim


def describe(c: dict[str, Any]) -> str:
    """A condition as the reply format writes it: ``pole_angle > 0.05``, ``|cart_pos| > 1``."""
    if "tokens" in c:
        return "token in " + ", ".join(repr(t) for t in c["tokens"])
    name = f"|{c['metric']}|" if c["op"].startswith("abs") else c["metric"]
    return f"{name} {c['op'][-1]} {c['value']:+.4g}"
