"""What a judge is shown, and the two judges.

Every example comes from TEST episodes (see :mod:`explainer.context`), never those the prompt
showed. After delphi:

- *detection* items: a step with the steps before it. Activating ones are drawn from four
  activation quantiles; non-activating ones are half random quiet steps and half hard negatives,
  quiet steps closest to an activating one in metric space (z-scored) or in time.
- *fuzzing* items: a few consecutive steps around a step, one of them marked. The mark is right
  when it is on an activating step; wrong marks are moved off an activating step onto a quiet
  one in the same stretch (the hard kind: right situation, wrong moment) or put on a quiet step.
- *simulation* stretches (Bills et al.'s "top and random"): consecutive steps around strong
  activations and at random; the judge predicts every step's activation on 0-10.

The ``rules`` judge reads an explanation's conditions (:mod:`explainer.conditions`); an LLM judge
reads its text, in batches, and a batch whose reply is out of format counts as unanswered."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from explainer.conditions import predict, soft
from explainer.context import TEST, Steps
from explainer.prompt import JUDGE_SYSTEM, detection_prompt, fuzzing_prompt, parse_list, simulation_prompt

__all__ = ["Item", "detection_items", "fuzzing_items", "simulation_stretches", "RuleJudge", "LLMJudge"]


@dataclass
class Item:
    rows: list[int]  # the steps shown, oldest first
    mark: int  # the step asked about
    label: int  # 1: it activates there (detection), the mark is right (fuzzing)


def after(s: Steps, i: int, k: int) -> list[int]:
    out: list[int] = []
    j = i + 1
    while j < len(s) and len(out) < k and s.group[j] == s.group[i] and s.step[j] == s.step[i] + len(out) + 1:
        out.append(j)
        j += 1
    return out


def _pools(s: Steps) -> tuple[np.ndarray, np.ndarray]:
    test = s.rows(TEST)
    lo, hi = s.levels()
    if hi <= lo:  # a constant latent: nothing activates more than anything else
        return test[:0], test[:0]
    return test[s.act[test] >= hi], test[s.act[test] <= lo]


def _by_quantile(rng: np.random.Generator, active: np.ndarray, act: np.ndarray, n: int, bins: int = 4) -> list[int]:
    """``n`` of ``active``, drawn evenly from ``bins`` activation quantiles."""
    ordered = active[np.argsort(act[active], kind="stable")]
    chunks = [c for c in np.array_split(ordered, bins) if len(c)]
    out: list[int] = []
    per = -(-n // max(1, len(chunks)))
    for c in chunks:
        out += rng.choice(c, size=min(per, len(c)), replace=False).tolist()
    return [int(i) for i in rng.permutation(out)[:n]]


def detection_items(s: Steps, rng: np.random.Generator, n_pos: int, n_neg: int, *, context: int = 2) -> list[Item]:
    active, quiet = _pools(s)
    if len(active) < 5 or len(quiet) < 5:
        return []
    pos = _by_quantile(rng, active, s.act, n_pos)
    z = (s.metrics - s.metrics.mean(0)) / (s.metrics.std(0) + 1e-12)
    free = set(quiet.tolist())
    neg: list[int] = []
    for k, p in enumerate(pos[: n_neg // 2]):
        cand = np.array(sorted(free))
        if not len(cand):
            break
        if k % 2 == 0:  # closest in metric space
            j = int(cand[np.argmin(((z[cand] - z[p]) ** 2).sum(1))])
        else:  # closest in time, in the same episode if it has a quiet step
            same = cand[s.group[cand] == s.group[p]]
            pool = same if len(same) else cand
            j = int(pool[np.argmin(np.abs(s.step[pool] - s.step[p]))])
        neg.append(j)
        free.discard(j)
    rest = np.array(sorted(free))
    neg += rng.choice(rest, size=min(n_neg - len(neg), len(rest)), replace=False).tolist() if len(rest) else []
    items = [Item(s.before(i, context) + [i], i, 1) for i in pos] + [
        Item(s.before(int(i), context) + [int(i)], int(i), 0) for i in neg
    ]
    return [items[k] for k in rng.permutation(len(items))]


def _window(s: Steps, i: int, size: int, rng: np.random.Generator) -> list[int]:
    """Up to ``size`` consecutive steps holding ``i`` at a random place."""
    b, a = s.before(i, size - 1), after(s, i, size - 1)
    nb = min(len(b), int(rng.integers(0, size)))
    na = min(len(a), size - 1 - nb)
    nb = min(len(b), size - 1 - na)
    return b[len(b) - nb :] + [i] + a[:na]


def fuzzing_items(s: Steps, rng: np.random.Generator, n_pos: int, n_neg: int, *, size: int = 4) -> list[Item]:
    active, quiet = _pools(s)
    if len(active) < 5 or len(quiet) < 5:
        return []
    lo, _ = s.levels()
    items = [Item(w, i, 1) for i in _by_quantile(rng, active, s.act, n_pos) for w in [_window(s, i, size, rng)]]
    moved: list[Item] = []
    for i in rng.permutation(active):
        if len(moved) >= n_neg // 2:
            break
        w = _window(s, int(i), size, rng)
        calm = [j for j in w if s.act[j] <= lo]
        if calm:
            moved.append(Item(w, int(rng.choice(calm)), 0))
    calm_rows = rng.choice(quiet, size=min(n_neg - len(moved), len(quiet)), replace=False)
    items += moved + [Item(w, int(q), 0) for q in calm_rows for w in [_window(s, int(q), size, rng)]]
    return [items[k] for k in rng.permutation(len(items))]


def simulation_stretches(s: Steps, rng: np.random.Generator, n_top: int, n_random: int, *, length: int = 6) -> list[list[int]]:
    active, _ = _pools(s)
    test = s.rows(TEST)
    if len(active) < 5 or len(test) < 20:
        return []
    used: set[int] = set()
    out: list[list[int]] = []
    for i in active[np.argsort(-s.act[active], kind="stable")]:
        if len(out) >= n_top:
            break
        if int(i) in used:
            continue
        k = int(rng.integers(0, length))
        seq = s.before(int(i), k) + [int(i)] + after(s, int(i), length - 1 - k)
        if used.isdisjoint(seq):
            out.append(seq)
            used.update(seq)
    for i in rng.permutation(test):
        if len(out) >= n_top + n_random:
            break
        seq = [int(i)] + after(s, int(i), length - 1)
        if used.isdisjoint(seq):
            out.append(seq)
            used.update(seq)
    return [out[k] for k in rng.permutation(len(out))]


class RuleJudge:
    """Reads an explanation's conditions: a step is predicted active where they all hold; the
    graded prediction (for AUROC and simulation) is their soft form."""

    name = "rules"

    def __init__(self, s: Steps, names: list[str]) -> None:
        self.s, self.names = s, names
        self.spread = {m: float(np.std(s.metrics[:, j])) or 1.0 for j, m in enumerate(names)}

    def can_judge(self, explanation: dict[str, Any]) -> bool:
        return bool(explanation.get("conditions"))

    def _classify(self, explanation: dict[str, Any], items: list[Item]) -> tuple[list[float | None], list[float | None]]:
        rows = [it.mark for it in items]
        met = self.s.metrics[rows]
        hard = predict(explanation["conditions"], self.names, met).astype(float)
        graded = soft(explanation["conditions"], self.names, met, spread=self.spread)
        return list(hard), list(graded)

    detect = fuzz = _classify

    def simulate(self, explanation: dict[str, Any], seqs: list[list[int]]) -> list[float | None]:
        rows = [i for seq in seqs for i in seq]
        return list(10 * soft(explanation["conditions"], self.names, self.s.metrics[rows], spread=self.spread))


class LLMJudge:
    """Asks an LLM backend, ``batch`` examples (``sim_batch`` stretches) a call. ``check`` runs
    before every call (the worker's: is this job still mine?)."""

    def __init__(
        self,
        backend: Any,
        s: Steps,
        names: list[str],
        *,
        name: str,
        tags: Mapping[str, str] | None = None,
        check: Callable[[], None] | None = None,
        batch: int = 8,
        sim_batch: int = 2,
    ) -> None:
        self.backend, self.s, self.names, self.name = backend, s, names, name
        self.tags, self.check = dict(tags or {}), check or (lambda: None)
        self.batch, self.sim_batch = batch, sim_batch
        self.calls = 0
        self.unanswered = 0

    def can_judge(self, explanation: dict[str, Any]) -> bool:
        return bool(explanation.get("label") or explanation.get("text"))

    def _ask(self, prompt: str, n: int, top: int) -> list[float | None]:
        self.check()
        self.calls += 1
        got = parse_list(self.backend.complete(prompt, system=JUDGE_SYSTEM, tags=self.tags), n, top=top)
        if got is None:
            self.unanswered += 1
            return [None] * n
        return list(got)

    def _classify(self, explanation: dict[str, Any], items: list[Item], render: Callable[..., str]) -> tuple[list, list]:
        out: list[float | None] = []
        for k in range(0, len(items), self.batch):
            part = items[k : k + self.batch]
            out += self._ask(render(explanation, self.s, self.names, part), len(part), 1)
        return out, out

    def detect(self, explanation: dict[str, Any], items: list[Item]) -> tuple[list, list]:
        return self._classify(explanation, items, detection_prompt)

    def fuzz(self, explanation: dict[str, Any], items: list[Item]) -> tuple[list, list]:
        return self._classify(explanation, items, fuzzing_prompt)

    def simulate(self, explanation: dict[str, Any], seqs: list[list[int]]) -> list[float | None]:
        out: list[float | None] = []
        for k in range(0, len(seqs), self.sim_batch):
            part = seqs[k : k + self.sim_batch]
            out += self._ask(simulation_prompt(explanation, self.s, self.names, part), sum(map(len, part)), 10)
        return out
