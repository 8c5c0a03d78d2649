"""Alert rules from a YAML file, in the spirit of Prometheus alerting rules.

```yaml
webhooks: [{url: "http://127.0.0.1:9000/hook", timeout_s: 2, retries: 2}]
rules:
  - name: latent-spike        # unique
    kind: zscore              # zscore | threshold | wake | corr_flip
    run: "*"                  # glob over run names
    tap: "*policy_net.1:out"  # glob over taps
    channels: "*"             # "*" or a list of channel / latent indices
    z: 4                      # zscore: (value - EW mean) / EW std above this
    for: 3                    # steps the condition must hold before firing (0: at once)
    keep_firing_for: 10       # steps it keeps firing after the condition clears
    cooldown: 100             # steps after resolving before it may fire again
    severity: warning         # info | warning | critical
    labels: {team: rl}
```

``threshold`` takes ``above`` and/or ``below``; ``wake`` fires when a channel whose EW fraction
of steps above ``above`` (default 0) is under ``rare_below`` goes above it; ``corr_flip`` fires
when a channel's rolling correlation with ``metric`` changes sign while ``|r| >= min_abs``.
A mistake gives one line naming the rule and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Rule", "Webhook", "RulesFile", "RulesError", "load_rules", "parse_rules", "KINDS", "SEVERITIES"]

KINDS = ("zscore", "threshold", "wake", "corr_flip")
SEVERITIES = ("info", "warning", "critical")


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the rule and field."""


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str
    run: str = "*"
    tap: str = "*"
    channels: tuple[int, ...] | None = None  # None: all
    z: float = 4.0
    above: float | None = None
    below: float | None = None
    rare_below: float = 0.01
    metric: str = ""
    min_abs: float = 0.3
    baseline_alpha: float = 0.01
    for_steps: int = 0
    keep_firing_for: int = 0
    cooldown: int = 0
    severity: str = "warning"
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Webhook:
    url: str
    timeout_s: float = 2.0
    retries: int = 2


@dataclass(frozen=True)
class RulesFile:
    rules: tuple[Rule, ...]
    webhooks: tuple[Webhook, ...] = ()


_FIELDS = {
    "name",
    "kind",
    "run",
    "tap",
    "channels",
    "z",
    "above",
    "below",
    "rare_below",
    "metric",
    "min_abs",
    "baseline_alpha",
    "for",
    "keep_firing_for",
    "cooldown",
    "severity",
    "labels",
}


def _num(where: str, key: str, v: Any, *, lo: float | None = None, integer: bool = False) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise RulesError(f"{where}: field '{key}' must be {'an integer' if integer else 'a number'}, got {v!r}")
    if lo is not None and v < lo:
        raise RulesError(f"{where}: field '{key}' must be >= {lo}, got {v!r}")
    return v


def _rule(i: int, d: Any) -> Rule:
    where = f"rule #{i + 1}"
    if not isinstance(d, dict):
        raise RulesError(f"{where}: must be a mapping of fields")
    name = d.get("name")
    if not isinstance(name, str) or not name:
        raise RulesError(f"{where}: field 'name' is required (a non-empty string)")
    where = f"rule {name!r}"
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        raise RulesError(f"{where}: unknown field '{unknown[0]}' (known: {', '.join(sorted(_FIELDS))})")
    kind = d.get("kind")
    if kind not in KINDS:
        raise RulesError(f"{where}: field 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    kw: dict[str, Any] = {"name": name, "kind": kind}
    for key in ("run", "tap", "metric"):
        if key in d:
            if not isinstance(d[key], str):
                raise RulesError(f"{where}: field '{key}' must be a string")
            kw[key] = d[key]
    ch = d.get("channels", "*")
    if ch != "*":
        if not (isinstance(ch, list) and ch and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in ch)):
            raise RulesError(f"{where}: field 'channels' must be \"*\" or a list of channel indices")
        kw["channels"] = tuple(ch)
    for key in ("z", "above", "below", "rare_below", "min_abs", "baseline_alpha"):
        if key in d:
            kw[key] = float(_num(where, key, d[key]))
    for key, attr in (("for", "for_steps"), ("keep_firing_for", "keep_firing_for"), ("cooldown", "cooldown")):
        if key in d:
            kw[attr] = _num(where, key, d[key], lo=0, integer=True)
    sev = d.get("severity", "warning")
    if sev not in SEVERITIES:
        raise RulesError(f"{where}: field 'severity' must be one of {', '.join(SEVERITIES)}, got {sev!r}")
    kw["severity"] = sev
    labels = d.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(k, str) for k in labels):
        raise RulesError(f"{where}: field 'labels' must be a mapping of strings")
    kw["labels"] = {k: str(v) for k, v in labels.items()}
    if kind == "threshold" and "above" not in d and "below" not in d:
        raise RulesError(f"{where}: a threshold rule needs field 'above' or 'below'")
    if kind == "corr_flip" and not kw.get("metric"):
        raise RulesError(f"{where}: a corr_flip rule needs field 'metric'")
    if not 0.0 < kw.get("baseline_alpha", 0.01) < 1.0:
        raise RulesError(f"{where}: field 'baseline_alpha' must be in (0, 1)")
    return Rule(**kw)


def parse_rules(doc: Any) -> RulesFile:
    if not isinstance(doc, dict):
        raise RulesError("rules file: the top level must be a mapping with 'rules' (and optionally 'webhooks')")
    unknown = sorted(str(k) for k in set(doc) - {"rules", "webhooks"})
    if unknown:
        raise RulesError(f"rules file: unknown top-level field '{unknown[0]}' (known: rules, webhooks)")
    rules = doc.get("rules")
    if not isinstance(rules, list) or not rules:
        raise RulesError("rules file: field 'rules' must be a non-empty list")
    parsed = tuple(_rule(i, r) for i, r in enumerate(rules))
    names = [r.name for r in parsed]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise RulesError(f"rule {dup!r}: field 'name' is used twice")
    hooks = []
    webhooks = doc.get("webhooks") or []
    if not isinstance(webhooks, list):
        raise RulesError("rules file: field 'webhooks' must be a list of {url, timeout_s, retries}")
    for i, h in enumerate(webhooks):
        extra = sorted(str(k) for k in set(h) - {"url", "timeout_s", "retries"}) if isinstance(h, dict) else []
        if extra:
            raise RulesError(f"webhook #{i + 1}: unknown field '{extra[0]}' (known: retries, timeout_s, url)")
        if not isinstance(h, dict) or not isinstance(h.get("url"), str) or not h["url"].startswith(("http://", "https://")):
            raise RulesError(f"webhook #{i + 1}: field 'url' must be an http(s) URL")
        hooks.append(
            Webhook(
                url=h["url"],
                timeout_s=float(_num(f"webhook #{i + 1}", "timeout_s", h.get("timeout_s", 2.0), lo=0.01)),
                retries=_num(f"webhook #{i + 1}", "retries", h.get("retries", 2), lo=0, integer=True),
            )
        )
    return RulesFile(rules=parsed, webhooks=tuple(hooks))


def load_rules(path: str | Path) -> RulesFile:
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as e:
        raise RulesError(f"rules file {path}: not found") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise RulesError(f"rules file {path}: not valid YAML{at}") from e
    return parse_rules(doc)
