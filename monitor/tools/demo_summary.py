"""What the headless demo prints at the end: each part of the mission and what it showed."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from monitor.store.keys import LATENT_PREFIX
from monitor.store.records import Store

if TYPE_CHECKING:
    from monitor.tools.demo import Episode, SteerPlan

__all__ = ["EARLY_K", "summary"]

EARLY_K = 20  # an alert is right if a failure follows within this many steps (`interlatent evaluate-alerts --k`)


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def summary(store: Store, run: str, episodes: list[Episode], plan: SteerPlan | None) -> list[str]:
    """The headless demo's report: the policy's failure modes, the transcoder and its latents with
    their explanations and scores, the alerts (those on latents with their explanations), the
    rules' early-warning precision and lead (on the episodes no steer touched), and the steer's
    effect on returns."""
    from monitor.service.steering import steer_effects
    from monitor.stats.early import evaluate_alerts
    from monitor.tools.demo import latent_tap

    def modes(eps: list[Episode]) -> str:
        return ", ".join(f"{m} {k}" for m, k in Counter(e.mode for e in eps).most_common()) or "none"

    def mean(eps: list[Episode]) -> str:
        return f"{np.mean([e.ret for e in eps]):.1f}" if eps else "-"

    lines = [f"== what the demo showed (run {run}) =="]
    lines.append(f"episodes: {len(episodes)}, mean return {mean(episodes)}; ended by {modes(episodes)}")
    tc = next((t for t in store.transcoders() if t["run"] == run), None)
    tap = latent_tap(store, run)
    if tc is None or tap is None:
        lines.append("latents: none yet (the transcoder trains after the warm-up; run more --steps, or --headless alone)")
    else:
        q = tc.get("quality") or {}
        lines.append(
            f"transcoder {tc['name']}: {tc['source']} -> {tc['target']}, {tc['d_sae']} latents, "
            f"FVU {_fmt(q.get('fvu'), '.3f')}, L0 {_fmt(q.get('l0'))}; its latents stream as {tap}"
        )
        for j in range(store.taps(run)[tap]["width"]):
            e = store.explanation(run, tap, j)
            if e is None or e.get("error"):
                lines.append(f"  latent {j}: " + (f"explaining failed: {e['error']}" if e else "not explained yet"))
                continue
            sc = e.get("score") or {}
            lines.append(
                f"  latent {j}: {e.get('label')!r}  detection {_fmt(sc.get('balanced_accuracy'))} "
                f"(shuffled {_fmt(sc.get('shuffled'))}), simulation r {_fmt(sc.get('simulation'))}"
            )
    alerts = [a for a in store.alerts(run) if a.get("rule") != "steering"]
    firing = [a for a in alerts if a.get("state") == "firing"]
    by_rule = Counter((a["rule"], a.get("unit", "channel")) for a in firing)
    lines.append(
        f"alerts: {len(firing)} fired, {sum(a.get('state') == 'resolved' for a in alerts)} resolved; "
        + (", ".join(f"{r} {k} (on {u}s)" for (r, u), k in sorted(by_rule.items())) or "none")
    )
    for a in [a for a in firing if a.get("unit") == "latent"][-3:]:
        e = store.explanation(run, a["tap"], a["latent"]) or a.get("explanation") or {}
        lines.append(
            f"  {a['rule']} on latent {a['latent']} at step {a['step']} (z {_fmt(a.get('z'), '.1f')}): "
            + (f"explained as {e['label']!r}" if e.get("label") else "not explained yet")
        )
    effects = steer_effects(store, run)
    spans = [(ef["applied_step"], np.inf if ef["reverted_step"] is None else ef["reverted_step"]) for ef in effects]

    def unsteered(step: float) -> bool:
        return not any(a <= step < b + EARLY_K for a, b in spans)

    ew = evaluate_alerts(
        [a for a in alerts if unsteered(a["step"])], [e for e in store.episodes(run) if unsteered(e["step"])], k=EARLY_K
    )
    lines.append(
        f"early warning, on the {ew['episodes']} episodes no steer touched ({ew['failures']} failed): "
        f"an alert is right when a failure follows within {EARLY_K} steps"
    )
    for rule, r in ew["rules"].items():
        lines.append(
            f"  {rule:<28} alerts {r['alerts']:>4}  precision {_fmt(r['precision'])}  recall {_fmt(r['recall'])}  "
            f"median lead {_fmt(r['median_lead_steps'], 'g')} steps"
        )
    for sug in store.suggestions(run)[:2]:
        rule = sug["rule"]
        unit = "latent" if rule["tap"].startswith(LATENT_PREFIX) else "channel"
        lines.append(
            f"  suggested: {unit} {sug['channel']} of {rule['tap']} {sug['direction']} {rule.get(sug['direction'])} "
            f"(it moved {sug['score_std']} std before {sug['moved_in']:.0%} of {sug['failures']} failures)"
        )
    if not effects:
        lines.append(
            "steer: " + ("off (--no-steer)" if plan is None else f"not applied (it waits for the latents; it was {plan.state})")
        )
    for ef in effects:
        b, d, diff = ef["before"], ef["during"], ef["difference"]
        until = ef["reverted_step"]
        j = str(ef["id"]).rpartition("/")[2]
        line = (
            f"steer: add alpha={plan.target[2]:+g} along latent {j}" if plan is not None and plan.target else f"steer {ef['id']}"
        ) + f" from step {ef['applied_step']} to {until if until is not None else 'the end'}: "
        line += f"mean return {d['mean_return']} over {d['episodes']} episodes while on, {b['mean_return']} over {b['episodes']} before"
        if diff is not None and diff["ci"][0] is not None:
            line += f"; difference {diff['mean']:+.1f} [{diff['ci'][0]:+.1f}, {diff['ci'][1]:+.1f}] (95%)"
        lines.append(line)
        on = [e for e in episodes if ef["applied_step"] <= e.step < (np.inf if until is None else until)]
        after = [e for e in episodes if until is not None and e.step >= until]
        lines.append(
            f"  while on they ended by {modes(on)}; after the revert: mean return {mean(after)} over {len(after)} episodes"
        )
    return lines
