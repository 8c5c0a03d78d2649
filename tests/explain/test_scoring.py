"""Reading explanations, the rules backend's term selection, the scores and the prompt, on planted
CartPole-like steps (no Redis: the split steps are built as the worker builds them)."""

from __future__ import annotations

import numpy as np
import pytest

from explainer.conditions import Reference, conditions_from_text
from explainer.context import EXPLAIN, TEST, VALIDATE, LatentContext, policy_examples, split_steps
from explainer.judges import RuleJudge
from explainer.prompt import ReplyError, parse_reply, render_prompt
from explainer.rules import explain_rules
from explainer.scoring import score_explanation

NAMES = ["cart_position", "cart_velocity", "pole_angle", "pole_angular_velocity", "action"]


def _episodes(n: int, length: int = 40) -> list[dict]:
    return [{"step": s, "index": 0} for s in range(length - 1, n, length)]


def _metrics(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.normal(0, [0.8, 0.5, 0.05, 0.3, 0.5], (n, 5))
    m[:, 1] -= 1.2 * m[:, 3]  # cart velocity tracks the angular velocity (r about -0.77): a tempting second term
    m[:, 4] = rng.integers(0, 2, n)
    return m


def _ctx(act: np.ndarray, met: np.ndarray, *, episodes: list[dict] | None = None) -> LatentContext:
    n = len(act)
    pos = np.stack([np.arange(n), np.zeros(n, dtype=np.int64)], axis=1)
    s = split_steps(act.astype(np.float64), met, pos, _episodes(n) if episodes is None else episodes)
    ex = s.rows(EXPLAIN)
    corr = {m: round(float(np.corrcoef(s.act[ex], s.metrics[ex, j])[0, 1]), 4) for j, m in enumerate(NAMES)}
    top, quiet = policy_examples(s, NAMES)
    return LatentContext(run="r", tap="t", latent=0, metrics=NAMES, corr=corr, top=top, quantiles=quiet, stats={}, steps=s)


def _reference(ctx: LatentContext) -> Reference:
    s = ctx.steps
    ex = s.rows(EXPLAIN)
    return Reference(NAMES, s.metrics[ex], s.act[ex] >= s.levels()[1])


def test_metric_names_are_read_on_word_boundaries_and_in_natural_forms() -> None:
    met = _metrics(512)
    ctx = _ctx(np.maximum(0, 20 * met[:, 2]), met)
    ref = _reference(ctx)
    angle = conditions_from_text("the pole angle is high", NAMES, ref)
    assert [(c["metric"], c["op"]) for c in angle] == [("pole_angle", ">")]
    assert (
        conditions_from_text("Fires in a small fraction of steps when the pole angle is high", NAMES, ref) == angle
    )  # no action
    assert conditions_from_text("fires when the angle is large", NAMES, ref) == angle
    got = conditions_from_text("high angular velocity", NAMES, ref)
    assert [(c["metric"], c["op"]) for c in got] == [("pole_angular_velocity", ">")]
    assert conditions_from_text("the velocity is high", NAMES, ref) == []  # cart or pole? no claim
    assert conditions_from_text("high poleangle and high cartvel", NAMES, ref) == []  # words, not substrings
    assert conditions_from_text("the action is 1", NAMES, ref)[0]["metric"] == "action"


def test_negation_is_no_claim_and_every_named_metric_counts_in_order() -> None:
    met = _metrics(512)
    ref = _reference(_ctx(np.maximum(0, 20 * met[:, 2]), met))
    for text in ("high pole_angle; not related to cart_velocity", "high pole_angle, regardless of cart velocity",
                 "high pole_angle. The cart velocity does not matter.", "high pole angle, unrelated to the cart velocity"):  # fmt: skip
        assert [c["metric"] for c in conditions_from_text(text, NAMES, ref)] == ["pole_angle"], text
    got = conditions_from_text(
        "low action, high pole_angular_velocity and cart position above 0.5 and low pole angle", NAMES, ref
    )
    assert [(c["metric"], c["op"]) for c in got] == [
        ("action", "<"),
        ("pole_angular_velocity", ">"),
        ("cart_position", ">"),
        ("pole_angle", "<"),
    ]  # all four, in the order named (not the first two in column order)
    assert got[2]["value"] == 0.5  # a stated number is the threshold
    both = conditions_from_text("the pole angle and the angular velocity are both high", NAMES, ref)
    assert [(c["metric"], c["op"]) for c in both] == [("pole_angle", ">"), ("pole_angular_velocity", ">")]
    far = conditions_from_text("|cart_position| > 1.2; the cart far from the center in either direction", NAMES, ref)
    assert far == [{"metric": "cart_position", "op": "abs>", "value": 1.2}]


def test_the_rules_backend_adds_a_second_term_only_when_it_helps() -> None:
    met = _metrics(512)
    # a channel that is the pole's angular velocity: cart velocity correlates too, but adds nothing
    ctx = _ctx(met[:, 3] + 0.02 * np.random.default_rng(1).standard_normal(512), met)
    out = explain_rules(ctx)
    assert [c["metric"] for c in out["conditions"]] == ["pole_angular_velocity"] and abs(ctx.corr["cart_velocity"]) > 0.5
    judge = RuleJudge(ctx.steps, NAMES)
    one = score_explanation(ctx, out, judge)["methods"]["detection"]["balanced_accuracy"]["value"]
    cart = {"metric": "cart_velocity", "op": "<", "value": -0.3}
    two = score_explanation(ctx, out | {"conditions": out["conditions"] + [cart]}, judge)
    assert one > 0.95 > two["methods"]["detection"]["balanced_accuracy"]["value"]  # the AND the old backend wrote is worse
    # a conjunction: falling right is a high angle and a high angular velocity, and the second term is kept
    fall = _ctx(np.maximum(0, met[:, 2] - 0.02) * np.maximum(0, met[:, 3] - 0.1) * 100, met)
    got = explain_rules(fall)
    assert sorted(c["metric"] for c in got["conditions"]) == ["pole_angle", "pole_angular_velocity"]
    assert got["label"].count(" and ") == 1


def test_scores_have_intervals_and_two_baselines() -> None:
    met = _metrics(512)
    fall = _ctx(np.maximum(0, met[:, 2] - 0.02) * np.maximum(0, met[:, 3] - 0.1) * 100, met)
    judge = RuleJudge(fall.steps, NAMES)
    right = score_explanation(fall, explain_rules(fall), judge)
    wrong = score_explanation(
        fall, {"label": "x", "text": "", "conditions": [{"metric": "cart_position", "op": ">", "value": 0.3}]}, judge
    )
    assert right["baseline_metric"] in ("pole_angle", "pole_angular_velocity") and right["held_out"] == "episodes"
    for method, key in (("detection", "balanced_accuracy"), ("fuzzing", "balanced_accuracy"), ("simulation", "correlation")):
        r, w = right["methods"][method], wrong["methods"][method]
        chance, bar = r["baselines"]["shuffled"][key], r["baselines"]["strongest_metric"][key]
        assert chance["ci"][0] < (0.5 if key != "correlation" else 0.0) < chance["ci"][1]
        assert r[key]["ci"][0] > bar["value"] and r[key]["ci"][0] > chance["ci"][1] and r["above_baselines"], method
        assert w[key]["ci"][0] < chance["ci"][1] and not w["above_baselines"], method  # a wrong explanation is at chance
    det = right["methods"]["detection"]
    assert det["f1"]["value"] > 0.8 and det["auroc"]["value"] >= det["balanced_accuracy"]["value"] - 0.05


def test_held_out_steps_come_from_other_episodes() -> None:
    met = _metrics(512)
    ctx = _ctx(np.maximum(0, 20 * met[:, 2]), met, episodes=_episodes(512, 37))
    s = ctx.steps
    episode = {int(st): int(np.searchsorted(np.arange(36, 512, 37), st)) for st in s.step}
    shown = {episode[e["step"]] for e in ctx.top + ctx.quantiles} | {episode[b["step"]] for e in ctx.top for b in e["before"]}
    assert shown and shown.isdisjoint({episode[int(st)] for st in s.step[s.rows(TEST)]})
    assert shown.isdisjoint({episode[int(st)] for st in s.step[s.rows(VALIDATE)]})
    assert all(
        e["before"] and [b["step"] for b in e["before"]] == list(range(e["step"] - len(e["before"]), e["step"]))
        for e in ctx.top[:3]
    )
    whole = _ctx(np.maximum(0, 20 * met[:, 2]), met, episodes=[])  # no episode ends known: stretches of steps
    assert whole.steps.group.max() + 1 >= 5 and len(set(whole.steps.split.tolist())) == 3


def test_the_prompt_gives_what_a_person_would_need() -> None:
    met = _metrics(512)
    ctx = _ctx(np.maximum(0, 20 * met[:, 2]), met)
    p = render_prompt(ctx)
    assert max(e["norm"] for e in ctx.top) == 10 and all(0 <= e["norm"] <= 10 for e in ctx.top + ctx.quantiles)
    e = ctx.top[0]
    shown = f"step {e['step']}: 10 | cart_position={e['metrics']['cart_position']:+.4g}"
    assert shown in p and f"step {e['before'][-1]['step']}: " in p  # the activation, the steps before it, named values
    assert "0-10 scale" in p and "5th to 95th percentile" in p and "pole_angular_velocity:" in p
    assert "A good reply:" in p and p.rstrip().endswith("or none")  # a worked example, and the reply format
    assert p.index("Example 1:") < p.index("Quiet steps:", p.index("Now the unit"))


def test_a_reply_is_parsed_strictly() -> None:
    ok = parse_reply(
        "LABEL: tilted right\nEXPLANATION: The pole leans right.\nCONDITIONS: pole_angle > 0.02; |Cart_Position| < 1; speed > 2",
        NAMES,
    )
    assert (ok["label"], ok["text"]) == ("tilted right", "The pole leans right.")
    assert ok["conditions"] == [
        {"metric": "pole_angle", "op": ">", "value": 0.02},
        {"metric": "cart_position", "op": "abs<", "value": 1.0},
    ]
    assert ok["dropped"] == ["speed > 2"]  # not a metric: dropped, never guessed at
    assert parse_reply("**LABEL:** a\n\nEXPLANATION: b\nCONDITIONS: none", NAMES)["conditions"] == []
    for bad in (
        "The unit likes high pole angles.",
        "LABEL: a\nEXPLANATION: b",
        "EXPLANATION: b\nLABEL: a\nCONDITIONS: none",
        "LABEL: a\nEXPLANATION: b\nCONDITIONS: none\nI hope this helps!",
        "LABEL:\nEXPLANATION: b\nCONDITIONS: none",
    ):
        with pytest.raises(ReplyError):
            parse_reply(bad, NAMES)


def test_a_constant_latent_gets_no_claim_and_no_score() -> None:
    met = _metrics(512)
    ctx = _ctx(np.full(512, 0.3), met)
    assert explain_rules(ctx)["conditions"] == []
    got = score_explanation(
        ctx,
        {"label": "x", "text": "", "conditions": [{"metric": "pole_angle", "op": ">", "value": 0}]},
        RuleJudge(ctx.steps, NAMES),
    )
    assert got["methods"] == {"detection": None, "fuzzing": None, "simulation": None} and got["balanced_accuracy"] is None
