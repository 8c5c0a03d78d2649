"""Early warning: which channels rise in the last ``k`` steps before an episode fails, and how
well alert rules foretold the failures a run has had.

An episode *fails* when it terminates (the env ended it) rather than being truncated (a time
limit). For each failure the monitor averages every channel over that env's last ``k`` rows
before the end and compares it with the channel's overall mean: a channel whose pre-failure
mean stands far above its usual level is a warning sign, and gets a ready threshold rule.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FailureProfile", "suggest_rules", "evaluate_alerts"]


@dataclass
class FailureProfile:
    """Per channel of one tap: the sum of its mean over the last ``k`` rows before each failure."""

    width: int
    k: int = 20
    failures: int = 0
    pre_sum: np.ndarray = field(init=False)
    waiting: list[tuple[int, int]] = field(default_factory=list)  # (end step, env index) not yet seen in full

    def __post_init__(self) -> None:
        self.pre_sum = np.zeros(self.width)

    def failed(self, end_step: int, index: int) -> None:
        self.waiting.append((end_step, index))

    def absorb(self, recent: tuple[np.ndarray, np.ndarray], newest_step: int) -> None:
        """Use the tap's recent rows for every failure whose last step has arrived."""
        data, pos = recent
        still = []
        for end, index in self.waiting:
            if newest_step < end:
                still.append((end, index))
                continue
            mask = (pos[:, 1] == index) & (pos[:, 0] <= end) & (pos[:, 0] > end - self.k)
            if mask.any():
                self.pre_sum += data[mask].mean(axis=0)
                self.failures += 1
        self.waiting = still[-1000:]


def suggest_rules(tap: str, profile: FailureProfile, mean: np.ndarray, std: np.ndarray, *, top: int = 3, min_score: float = 1.0) -> list[dict[str, Any]]:
    """Threshold rules for the channels whose pre-failure mean is furthest above their usual mean,
    in standard deviations; the threshold sits halfway between the two means."""
    if profile.failures == 0:
        return []
    pre = profile.pre_sum / profile.failures
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(std > 1e-12, (pre - mean) / std, 0.0)
    out = []
    for c in np.argsort(-score)[:top]:
        if score[c] < min_score:
            break
        out.append({
            "rule": {"name": f"early-warning-{tap}-{int(c)}", "kind": "threshold", "tap": tap, "channels": [int(c)],
                     "above": round(float((mean[c] + pre[c]) / 2), 6), "severity": "warning"},
            "channel": int(c), "score_std": round(float(score[c]), 3), "pre_failure_mean": round(float(pre[c]), 6),
            "mean": round(float(mean[c]), 6), "failures": profile.failures, "k": profile.k,
        })
    return out


def evaluate_alerts(alerts: list[dict[str, Any]], episodes: list[dict[str, Any]], *, k: int) -> dict[str, Any]:
    """Precision and recall of each rule's firing alerts for "an episode fails within k steps",
    and the median lead time (steps from the first alert to the failure), per rule.

    ``alerts`` are firing events (step, index, rule); ``episodes`` have step (the last step),
    index and terminated.
    """
    failures = [(int(e["step"]), int(e["index"])) for e in episodes if int(e["terminated"])]
    by_rule: dict[str, list[tuple[int, int]]] = {}
    for a in alerts:
        if a.get("state") == "firing":
            by_rule.setdefault(a["rule"], []).append((int(a["step"]), int(a["index"])))
    out: dict[str, Any] = {"k": k, "episodes": len(episodes), "failures": len(failures), "rules": {}}
    for rule, fired in sorted(by_rule.items()):
        hits = sum(any(i == fi and s < end <= s + k for end, fi in failures) for s, i in fired)
        leads = []
        for end, fi in failures:
            before = [s for s, i in fired if i == fi and end - k <= s < end]
            if before:
                leads.append(end - min(before))
        out["rules"][rule] = {
            "alerts": len(fired), "precision": round(hits / len(fired), 4) if fired else None,
            "recall": round(len(leads) / len(failures), 4) if failures else None,
            "median_lead_steps": statistics.median(leads) if leads else None,
        }
    return out
