"""What an LLM is asked, and how its replies are read (strictly: a reply out of format is refused,
never guessed at).

The explanation prompt follows Bills et al. (2023): activations on a 0-10 scale, 10 the highest
among the examples; the RL counterpart of a token's context is the steps before each activation,
each with the named metric values; one worked example of another unit; and a three-line reply,
``LABEL:``, ``EXPLANATION:``, ``CONDITIONS:``. The judge prompts (detection, fuzzing,
simulation) follow delphi's: numbered examples, and a reply that is one list."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # context.py re-exports render_prompt, so this module imports nothing of it at run time
    from explainer.context import LatentContext, Steps

__all__ = [
    "ReplyError",
    "render_prompt",
    "parse_reply",
    "detection_prompt",
    "fuzzing_prompt",
    "simulation_prompt",
    "parse_list",
    "JUDGE_SYSTEM",
]

JUDGE_SYSTEM = (
    "You judge explanations of units inside a reinforcement-learning policy: given an explanation and steps of the "
    "agent, you say what the explanation predicts. You reply with one list and nothing else."
)

FEW_SHOT = """An example, for a unit of another agent (a lander; metrics altitude, vertical_speed, leg_contact):
  Example 1:
    step 40: 1 | altitude=+0.8, vertical_speed=-0.1, leg_contact=+0
    step 41: 6 | altitude=+0.35, vertical_speed=-0.9, leg_contact=+0
    step 42: 10 | altitude=+0.2, vertical_speed=-1.1, leg_contact=+0
  Quiet steps:
    step 7: 0 | altitude=+1.4, vertical_speed=-0.2, leg_contact=+0
    step 90: 0 | altitude=+0, vertical_speed=+0, leg_contact=+1
A good reply:
LABEL: falling fast near the ground
EXPLANATION: Fires when the lander is low and descending fast, in the steps before a hard landing.
CONDITIONS: altitude < 0.5; vertical_speed < -0.6"""

REPLY_FORMAT = """Reply with exactly these three lines and nothing else:
LABEL: a few words
EXPLANATION: one or two sentences that name the metrics involved and say whether they are high or low
CONDITIONS: when it activates, as METRIC > NUMBER or METRIC < NUMBER (|METRIC| for a magnitude), joined by ';', with the metric names above; or none"""


class ReplyError(ValueError):
    """A reply that is not in the format asked for."""


def _num(v: float) -> str:
    return f"{v:+.4g}"


def _metrics_line(names: list[str], values: Any) -> str:
    return ", ".join(f"{n}={_num(float(v))}" for n, v in zip(names, values, strict=True))


def _example_line(e: dict[str, Any], names: list[str]) -> str:
    return f"step {e['step']}: {e['norm']} | " + _metrics_line(names, [e["metrics"][n] for n in names])


def _token_example(e: dict[str, Any]) -> str:
    if "context" in e:
        return f"  step {e['step']}, token {e['index']}: activation {e['value']:.3f}; text: {e['context']!r}"
    ms = ", ".join(f"{k}={v:+.3f}" for k, v in e["metrics"].items() if v is not None)
    return f"  step {e['step']}: activation {e['value']:.3f}; {ms}"


def _corr_line(ctx: LatentContext) -> str:
    pairs = sorted(((m, r) for m, r in ctx.corr.items() if r is not None), key=lambda x: -abs(x[1]))
    return ", ".join(f"{m} {r:+.2f}" for m, r in pairs) or "none defined"


def render_prompt(ctx: LatentContext) -> str:
    """The prompt an LLM backend gets (and whose hash every explanation records)."""
    if ctx.steps is None:
        return _token_prompt(ctx)
    s = ctx.steps
    ex = s.rows(0)  # EXPLAIN: the steps the prompt shows
    ranges = [
        f"  {m}: {_num(float(np.quantile(s.metrics[ex, j], 0.05)))} to {_num(float(np.quantile(s.metrics[ex, j], 0.95)))}"
        for j, m in enumerate(ctx.metrics)
    ]
    lines = [
        f"A unit of a reinforcement-learning policy network (run {ctx.run}, tap {ctx.tap}, unit #{ctx.latent}), watched while the agent acts.",
        "Its activation is on a 0-10 scale: 10 is its highest activation among these steps, 0 is silent or typical.",
        "The environment logs these metrics at every step, in its own units (5th to 95th percentile here):",
        *ranges,
        f"Correlation of the unit with each metric on these steps: {_corr_line(ctx)}.",
        "",
        FEW_SHOT,
        "",
        "Now the unit to explain. Its strongest activations, each with the steps before it (step: activation | metrics):",
    ]
    for k, e in enumerate(ctx.top, 1):
        lines.append(f"  Example {k}:")
        lines += [f"    {_example_line(b, ctx.metrics)}" for b in e.get("before", [])]
        lines.append(f"    {_example_line(e, ctx.metrics)}")
    lines.append("  Quiet steps:")
    lines += [f"    {_example_line(e, ctx.metrics)}" for e in ctx.quantiles]
    lines += ["", "Say what situation this unit detects.", REPLY_FORMAT]
    return "\n".join(lines)


def _token_prompt(ctx: LatentContext) -> str:
    what = (
        "language model, shown text it reads; the token it fires on is marked ⟦so⟧"
        if ctx.tokens
        else "policy, watched while the agent acts"
    )
    return "\n".join(
        [
            f"A unit of a neural network {what} (run {ctx.run}, {ctx.tap}, #{ctx.latent}).",
            f"Its statistics: {ctx.stats}.",
            f"Pearson correlation with each environment metric: {_corr_line(ctx)}.",
            "The steps where it activates most:",
            *map(_token_example, ctx.top),
            "One step from each activation decile, lowest first:",
            *map(_token_example, ctx.quantiles),
            "In a short label and one or two sentences, say what "
            + ("text pattern" if ctx.tokens else "situation")
            + " this unit detects.",
            REPLY_FORMAT.replace("with the metric names above", "with the metric names above, or token in 'a', 'b'"),
        ]
    )


_FIELD = re.compile(r"^\s*(?:[*#>`_ ]*)(label|explanation|conditions)\s*[*_]*\s*:\s*[*_]*\s*(.*?)\s*$", re.IGNORECASE)
_COND = re.compile(r"^(\|?)\s*([A-Za-z_][\w.:\-]*)\s*(\|?)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")


def parse_reply(reply: str, metrics: list[str]) -> dict[str, Any]:
    """``{"label", "text", "conditions", "dropped"}`` from a three-line reply; a :class:`ReplyError`
    when a line is missing, repeated, empty or out of order, or other text is there. Conditions
    on names that are not metrics are dropped (and listed), never guessed at."""
    got: dict[str, str] = {}
    for line in str(reply).strip().splitlines():
        if not line.strip() or line.strip().startswith("```"):
            continue
        m = _FIELD.match(line)
        if m is None:
            raise ReplyError(f"a line that is not LABEL:, EXPLANATION: or CONDITIONS: ({line.strip()[:60]!r})")
        key = m.group(1).lower()
        if key in got:
            raise ReplyError(f"{key.upper()}: twice")
        got[key] = m.group(2)
    order = [k for k in ("label", "explanation", "conditions") if k in got]
    if order != ["label", "explanation", "conditions"] or list(got) != order:
        raise ReplyError("the reply needs LABEL:, EXPLANATION: and CONDITIONS:, in that order")
    if not got["label"] or not got["explanation"]:
        raise ReplyError("an empty LABEL: or EXPLANATION:")
    by_lower = {m.lower(): m for m in metrics}
    conditions, dropped = [], []
    raw = got["conditions"].strip().rstrip(".")
    for part in [] if raw.lower() in ("none", "") else raw.split(";"):
        c = _COND.match(part.strip())
        name = c and (c.group(2) if c.group(2) in metrics else by_lower.get(c.group(2).lower()))
        if c is None or name is None or bool(c.group(1)) != bool(c.group(3)):
            dropped.append(part.strip()[:80])
            continue
        op = c.group(4)[0]
        value = float(c.group(5))
        conditions.append(
            {"metric": name, "op": ("abs" + op) if c.group(1) else op, "value": abs(value) if c.group(1) else value}
        )
    return {"label": got["label"], "text": got["explanation"], "conditions": conditions, "dropped": dropped}


def _step_line(s: Steps, names: list[str], i: int, mark: bool = False) -> str:
    return f"{'>> ' if mark else ''}step {int(s.step[i])}: " + _metrics_line(names, s.metrics[i])


def _head(explanation: dict[str, Any]) -> str:
    return f"The explanation of the unit: {explanation['label']}. {explanation['text']}"


def detection_prompt(explanation: dict[str, Any], s: Steps, names: list[str], items: list[Any]) -> str:
    lines = [
        _head(explanation),
        "Each example below is a few consecutive steps of the agent (metric values at each). Does the unit, as explained, "
        "activate at the LAST step of the example?",
    ]
    for k, it in enumerate(items):
        lines.append(f"Example {k}:")
        lines += [f"  {_step_line(s, names, i)}" for i in it.rows]
    lines.append(f"Reply with one list of {len(items)} numbers, 1 for activates and 0 for not, like [1,0,0,1]; nothing else.")
    return "\n".join(lines)


def fuzzing_prompt(explanation: dict[str, Any], s: Steps, names: list[str], items: list[Any]) -> str:
    lines = [
        _head(explanation),
        "Each example below is a few consecutive steps of the agent with one step marked >>. Is the marked step one where "
        "the unit, as explained, activates (1), or is the mark wrong (0)?",
    ]
    for k, it in enumerate(items):
        lines.append(f"Example {k}:")
        lines += [f"  {_step_line(s, names, i, mark=i == it.mark)}" for i in it.rows]
    lines.append(f"Reply with one list of {len(items)} numbers, 1 for a correct mark and 0 for a wrong one; nothing else.")
    return "\n".join(lines)


def simulation_prompt(explanation: dict[str, Any], s: Steps, names: list[str], seqs: list[list[int]]) -> str:
    lines = [
        _head(explanation),
        "Below are stretches of consecutive steps of the agent. From the explanation alone, predict the unit's activation "
        "at every step on a 0-10 scale (10: its strongest activation, 0: silent).",
    ]
    k = 0
    for n, seq in enumerate(seqs):
        lines.append(f"Stretch {n}:")
        for i in seq:
            lines.append(f"  {k}. " + _step_line(s, names, i))
            k += 1
    lines.append(f"Reply with one list of {k} integers from 0 to 10, one per numbered step in order; nothing else.")
    return "\n".join(lines)


def parse_list(reply: str, n: int, *, top: int) -> list[float] | None:
    """The first ``[...]`` of a reply, when it is ``n`` numbers in ``[0, top]``; else None."""
    m = re.search(r"\[[^\[\]]*\]", str(reply))
    if m is None:
        return None
    try:
        vals = json.loads(m.group(0))
    except ValueError:
        return None
    if not isinstance(vals, list) or len(vals) != n:
        return None
    out = []
    for v in vals:
        if isinstance(v, bool):
            v = int(v)
        if not isinstance(v, int | float) or not 0 <= v <= top:
            return None
        out.append(float(v))
    return out
