"""Early warning: which channels rise in the last ``k`` steps before an episode fails, and how
well alert rules foretold the failures a run has had.

An episode *fails* when it terminates (the env ended it) rather than being truncated (a time
limit). For each failure the monitor averages every channel over that env's last ``k`` rows
before the end and measures how far, in standard deviations, that stands above or below the
channel's usual level. Failures come in modes (CartPole's pole falls left or right), so rises
and falls are kept apart instead of averaging to nothing: a channel's *rise score* is the mean
over failures of its rise (0 where it fell). The best channels get ready threshold rules.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FailureProfile", "suggest_rules", "evaluate_alerts"]


@dataclass
class FailureProfile:
    """Per channel of one tap: how far it rose and fell before each failure, in std."""

    width: int
    k: int = 20
    failures: int = 0
    waiting: list[tuple[int, int]] = field(default_factory=list)  # (end step, env index) not yet seen in full

    def __post_init__(self) -> None:
        self.rise = np.zeros(self.width)  # sum over failures of max(d, 0)
        self.fall = np.zeros(self.width)  # sum over failures of max(-d, 0)
        self.rose = np.zeros(self.width)  # failures with d > 0
        self.fell = np.zeros(self.width)

    def failed(self, end_step: int, index: int) -> None:
        self.waiting.append((end_step, index))

    def absorb(self, recent: tuple[np.ndarray, np.ndarray], newest_step: int, mean: np.ndarray, std: np.ndarray) -> None:
        """Use the tap's recent rows for every failure whose last step has arrived."""
        data, pos = recent
        still = []
        safe = np.where(std > 1e-12, std, np.inf)
        for end, index in self.waiting:
            if newest_step < end:
                still.append((end, index))
                continue
            mask = (pos[:, 1] == index) & (pos[:, 0] <= end) & (pos[:, 0] > end - self.k)
            if mask.any():
                d = (data[mask].mean(axis=0) - mean) / safe
                self.rise += np.maximum(d, 0.0)
                self.fall += np.maximum(-d, 0.0)
                self.rose += d > 0
                self.fell += d < 0
                self.failures += 1
        self.waiting = still[-1000:]


def suggest_rules(
    tap: str, profile: FailureProfile, mean: np.ndarray, std: np.ndarray, *, top: int = 3, min_score: float = 0.5
) -> list[dict[str, Any]]:
    """Threshold rules for the channels that move furthest before failures (rise or fall score,
    in std, averaged over all failures); the threshold sits halfway to the typical pre-failure
    level of the failures where the channel moved that way."""
    if profile.failures == 0:
        return []
    n = profile.failures
    out: list[dict[str, Any]] = []
    for direction, total, count in (("above", profile.rise, profile.rose), ("below", profile.fall, profile.fell)):
        score = total / n
        for c in np.argsort(-score)[:top]:
            if score[c] < min_score:
                break
            typical = total[c] / max(1.0, count[c])  # std moved, in the failures where it moved this way
            sign = 1.0 if direction == "above" else -1.0
            out.append(
                {
                    "rule": {
                        "name": f"early-warning-{tap}-{int(c)}-{direction}",
                        "kind": "threshold",
                        "tap": tap,
                        "channels": [int(c)],
                        direction: round(float(mean[c] + sign * typical / 2 * std[c]), 6),
                        "severity": "warning",
                    },
                    "channel": int(c),
                    "direction": direction,
                    "score_std": round(float(score[c]), 3),
                    "moved_in": round(float(count[c] / n), 3),
                    "mean": round(float(mean[c]), 6),
                    "failures": n,
                    "k": profile.k,
                }
            )
    return sorted(out, key=lambda x: -x["score_std"])[:top]


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
            "alerts": len(fired),
            "precision": round(hits / len(fired), 4) if fired else None,
            "recall": round(len(leads) / len(failures), 4) if failures else None,
            "median_lead_steps": statistics.median(leads) if leads else None,
        }
    return out
