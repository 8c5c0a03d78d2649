"""Alert rules from a YAML file, in the spirit of Prometheus alerting rules.

```yaml
webhooks:
  - url: "http://127.0.0.1:9000/hook"
    name: ops                 # the `receiver` label on /metrics (default: the URL's host:port)
    timeout_s: 2              # per POST
    retries: 2                # after the first try, with exponential backoff
    group_by: [rule, run]     # alert fields or rule labels; one POST carries one group's alerts
    group_wait: 1             # seconds to gather the first alerts of a new group
    group_interval: 10        # seconds between POSTs about changes to a group already sent
    repeat_interval: 3600     # seconds before a still-firing group is sent again (0: never)
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
A mistake gives one line naming the rule (or webhook) and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Rule", "Webhook", "RulesFile", "RulesError", "load_rules", "parse_rules", "KINDS", "SEVERITIES", "GROUP_FIELDS"]

KINDS = ("zscore", "threshold", "wake", "corr_flip")
SEVERITIES = ("info", "warning", "critical")
GROUP_FIELDS = (
    "rule",
    "kind",
    "severity",
    "run",
    "tap",
    "unit",
    "channel",
    "latent",
)  # alert fields a webhook may group by, besides labels


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
    """One receiver of alert POSTs, grouped and rate-limited like an Alertmanager route.

    The defaults are short next to Alertmanager's (30 s, 5 min, 4 h) because one monitor sees an
    alert the moment a row arrives, not after a scrape and an evaluation cycle: the alerts of one
    step (every tap, every channel) arrive within an agent flush or two (100 ms each by default),
    so a second gathers them into one message; and a training run lasts hours, so a still-firing
    alert is repeated hourly rather than every four hours.
    """

    url: str
    name: str = ""  # the receiver label; parse_rules fills in the URL's host:port
    timeout_s: float = 2.0
    retries: int = 2
    group_by: tuple[str, ...] = ("rule", "run")  # ("...",): every alert its own group
    group_wait_s: float = 1.0
    group_interval_s: float = 10.0
    repeat_interval_s: float = 3600.0  # 0: never repeat


@dataclass(frozen=True)
class RulesFile:
    rules: tuple[Rule, ...]
    webhooks: tuple[Webhook, ...] = ()


# fields that only some kinds read: anywhere else they would be silently ignored
_KIND_FIELDS = {
    "z": ("zscore",),
    "baseline_alpha": ("zscore", "wake"),
    "above": ("threshold", "wake"),
    "below": ("threshold",),
    "rare_below": ("wake",),
    "metric": ("corr_flip",),
    "min_abs": ("corr_flip",),
}

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
    if "|" in name or not name.isprintable() or len(name) > 200:
        raise RulesError(
            f"{where}: field 'name' must be printable, at most 200 characters, without '|' (it separates an alert id's parts)"
        )
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        raise RulesError(f"{where}: unknown field '{unknown[0]}' (known: {', '.join(sorted(_FIELDS))})")
    kind = d.get("kind")
    if kind not in KINDS:
        raise RulesError(f"{where}: field 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    foreign = sorted(k for k in set(d) & _KIND_FIELDS.keys() if kind not in _KIND_FIELDS[k])
    if foreign:
        raise RulesError(
            f"{where}: field '{foreign[0]}' does not apply to a {kind} rule (only to {', '.join(_KIND_FIELDS[foreign[0]])})"
        )
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
            if not math.isfinite(kw[key]):
                raise RulesError(f"{where}: field '{key}' must be a finite number, got {d[key]!r}")
    for key, lo, hi, what in (
        ("z", 0.0, math.inf, "above 0 (standard deviations over the baseline)"),
        ("rare_below", 0.0, 1.0, "in (0, 1] (a fraction of steps)"),
        ("min_abs", 0.0, 1.0, "in (0, 1] (a correlation's size)"),
    ):
        if key in kw and not lo < kw[key] <= hi:
            raise RulesError(f"{where}: field '{key}' must be {what}, got {kw[key]!r}")
    for key, attr in (("for", "for_steps"), ("keep_firing_for", "keep_firing_for"), ("cooldown", "cooldown")):
        if key in d:
            kw[attr] = _num(where, key, d[key], lo=0, integer=True)
    sev = d.get("severity", "warning")
    if sev not in SEVERITIES:
        raise RulesError(f"{where}: field 'severity' must be one of {', '.join(SEVERITIES)}, got {sev!r}")
    kw["severity"] = sev
    labels = d.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in labels.items()
    ):
        raise RulesError(f"{where}: field 'labels' must be a mapping of names to strings or numbers")
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
    return RulesFile(rules=parsed, webhooks=_webhooks(doc.get("webhooks") or [], parsed))


_WEBHOOK_FIELDS = ("url", "name", "timeout_s", "retries", "group_by", "group_wait", "group_interval", "repeat_interval")


def _seconds(where: str, key: str, v: Any, *, positive: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise RulesError(f"{where}: field '{key}' must be a number of seconds {'> 0' if positive else '>= 0'}, got {v!r}")
    return float(v)


def _webhook(i: int, h: Any, labels: set[str]) -> Webhook:
    where = f"webhook #{i + 1}"
    if not isinstance(h, dict):
        raise RulesError(f"{where}: must be a mapping of fields ({', '.join(_WEBHOOK_FIELDS)})")
    extra = sorted(str(k) for k in set(h) - set(_WEBHOOK_FIELDS))
    if extra:
        raise RulesError(f"{where}: unknown field '{extra[0]}' (known: {', '.join(sorted(_WEBHOOK_FIELDS))})")
    url = h.get("url")
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        port_ok = parts is not None and (parts.port or 0) >= 0
    except ValueError:  # a bad port or bracketed host
        parts, port_ok = None, False
    if parts is None or not port_ok or parts.scheme not in ("http", "https") or not parts.hostname:
        raise RulesError(f"{where}: field 'url' must be an http(s) URL, got {url!r}")
    name = h.get("name", parts.netloc.rpartition("@")[2])  # never a password in a label
    if not isinstance(name, str) or not name:
        raise RulesError(f"{where}: field 'name' must be a non-empty string")
    kw: dict[str, Any] = {"url": url, "name": name}
    for key in ("timeout_s", "group_wait", "group_interval", "repeat_interval"):
        if key in h:
            kw[key.removesuffix("_s") + "_s"] = _seconds(where, key, h[key], positive=key == "timeout_s")
    if "retries" in h:
        kw["retries"] = _num(where, "retries", h["retries"], lo=0, integer=True)
    if "group_by" in h:
        by = h["group_by"]
        if not isinstance(by, list) or not all(isinstance(k, str) for k in by):
            raise RulesError(f"{where}: field 'group_by' must be a list of alert fields or labels")
        if "..." in by and by != ["..."]:
            raise RulesError(f"{where}: field 'group_by' takes '...' (every alert alone) only on its own")
        unknown = [k for k in by if k != "..." and k not in GROUP_FIELDS and k not in labels]
        if unknown:
            raise RulesError(
                f"{where}: field 'group_by' names '{unknown[0]}', neither an alert field ({', '.join(GROUP_FIELDS)}) nor a rule's label"
            )
        kw["group_by"] = tuple(by)
    return Webhook(**kw)


def _webhooks(webhooks: Any, rules: tuple[Rule, ...]) -> tuple[Webhook, ...]:
    if not isinstance(webhooks, list):
        raise RulesError("rules file: field 'webhooks' must be a list of mappings (url, name, timeout_s, ...)")
    labels = {k for r in rules for k in r.labels}
    hooks = tuple(_webhook(i, h, labels) for i, h in enumerate(webhooks))
    names = [h.name for h in hooks]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise RulesError(f"webhook #{i + 1}: name {n!r} is used twice (set field 'name' to tell them apart)")
    return hooks


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
