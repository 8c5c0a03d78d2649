"""The whole protocol against a local OpenAI-compatible server that answers like a model would.

A CartPole-like run streams through a real monitor into Redis: four metrics that drift smoothly
within 40-step episodes, and five units with known meanings: #0 fires when the pole tilts right
AND still rotates right (a conjunction), #1 when the cart is far from the center on either side
(a magnitude), #2 tracks the pole angle, #3 and #4 are noise. The server reads each explain
prompt and answers from the planted truth for #0 and #1 and wrongly for the others (#2 gets
"cart velocity", #3 and #4 "pole angle"). As the judge it reads the explanation it is given, the
way a careful model would: the ``METRIC > NUMBER`` claims in its text, applied to the steps shown.

Correct explanations must score high with intervals above both baselines (shuffled labels and
the single strongest metric); wrong ones at or below them."""

from __future__ import annotations

import re

import numpy as np
import pytest
from chat_server import ChatServer

from agent_side.wire import encode_act, encode_ep, encode_met
from explainer import Worker, WorkerSettings, explanations, file_job
from monitor.service.ingest import Monitor
from monitor.store.records import Store

NAMES = ["cart_position", "cart_velocity", "pole_angle", "pole_angular_velocity"]
EPISODE = 40
ANSWERS = {
    0: "LABEL: falling right\nEXPLANATION: Fires when the pole is tilted right (pole_angle > 0.02) and still rotating right "
    "(pole_angular_velocity > 0.05).\nCONDITIONS: pole_angle > 0.02; pole_angular_velocity > 0.05",
    1: "LABEL: cart far off center\nEXPLANATION: Fires when the cart is far from the center on either side "
    "(|cart_position| > 1).\nCONDITIONS: |cart_position| > 1",
    2: "LABEL: cart moving right\nEXPLANATION: Fires when the cart moves right fast (cart_velocity > 0.3).\nCONDITIONS: cart_velocity > 0.3",
}
WRONG = (
    "LABEL: pole tilted right\nEXPLANATION: Fires when the pole tilts right (pole_angle > 0.03).\nCONDITIONS: pole_angle > 0.03"
)
PLANTED, WRONGLY = (0, 1), (2, 3, 4)


def stream_cartpole(store: Store, n: int = 800, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    sd = np.array([0.9, 0.5, 0.06, 0.3])
    m = np.zeros((n, 4))
    for t in range(n):  # smooth within an episode, fresh at each start
        fresh = rng.normal(0, sd)
        m[t] = fresh if t % EPISODE == 0 else 0.7 * m[t - 1] + np.sqrt(1 - 0.49) * fresh
    x = np.stack(
        [
            100 * np.maximum(0, m[:, 2] - 0.02) * np.maximum(0, m[:, 3] - 0.05),
            np.maximum(0, np.abs(m[:, 0]) - 1.0),
            np.maximum(0, 20 * m[:, 2]),
            rng.random(n),
            rng.random(n),
        ],
        axis=1,
    ).astype(np.float32)
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
    try:
        seq = 0
        for s in range(0, n, EPISODE):
            pos = np.stack([np.arange(s, s + EPISODE), np.zeros(EPISODE, dtype=np.int64)], axis=1)
            mon.handle(encode_act("cp", "p", seq, 0, "h:out", x[s : s + EPISODE], pos))
            mon.handle(encode_met("cp", "p", seq + 1, 0, NAMES, m[s : s + EPISODE], pos))
            mon.handle(encode_ep("cp", "p", seq + 2, 0, [(s + EPISODE - 1, 0, 1.0, EPISODE, 1, 0)]))
            seq += 3
        mon.flush(final=True)
    finally:
        mon.close()


_CLAIM = re.compile(r"(\|?)(" + "|".join(NAMES) + r")\|? *([<>]) *([-+]?\d*\.?\d+)")
_STEP = re.compile(r"step \d+: (.*)$")


def _reads(explanation: str):
    """What a careful reader takes from an explanation: its stated claims, all of them at once."""
    claims = [(bool(a), m, op, float(v)) for a, m, op, v in _CLAIM.findall(explanation)]

    def holds(values: dict[str, float]) -> bool:
        ok = bool(claims)
        for is_abs, m, op, v in claims:
            x = abs(values[m]) if is_abs else values[m]
            ok &= x > v if op == ">" else x < v
        return ok

    return holds


def _values(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in (kv.split("=") for kv in _STEP.search(line).group(1).split(", "))}


def model(prompt: str, system: str, hdr: dict) -> str:
    if "judge" not in system:
        unit = int(re.search(r"unit #(\d+)\)", prompt).group(1))
        return ANSWERS.get(unit, WRONG)
    holds = _reads(prompt.split("\n", 1)[0])
    if "predict the unit's activation" in prompt:
        steps = [ln for ln in prompt.splitlines() if re.match(r"\s+\d+\. step", ln)]
        return str([8 if holds(_values(ln)) else 0 for ln in steps])
    blocks = re.split(r"\nExample \d+:\n", prompt)[1:]
    asked = []
    for b in blocks:
        lines = [ln for ln in b.splitlines() if "step " in ln and "=" in ln]
        marked = [ln for ln in lines if ln.strip().startswith(">>")]
        asked.append((marked or lines)[-1])
    return str([int(holds(_values(ln))) for ln in asked])


def run_protocol(store: Store) -> dict[int, dict]:
    stream_cartpole(store)
    srv = ChatServer(model)
    try:
        for j in range(5):
            file_job(store.r, "cp", "h:out", j, reason="test")
        w = Worker(store, settings=WorkerSettings(backend=f"openai:{srv.url}"), consumer="w")
        assert w.run(burst=True) == 5, [e.get("error") for e in explanations(store.r, "cp")]
        kinds = {c.kind for c in srv.log()}
        assert kinds == {"explain", "judge"}
    finally:
        srv.close()
    return {e["latent"]: e for e in explanations(store.r, "cp")}


KEYS = (("detection", "balanced_accuracy"), ("fuzzing", "balanced_accuracy"), ("simulation", "correlation"))


@pytest.mark.timeout(120)
def test_correct_explanations_beat_both_baselines_and_wrong_ones_do_not(store: Store) -> None:
    got = run_protocol(store)
    assert [got[j]["label"] for j in PLANTED] == ["falling right", "cart far off center"]
    for j in range(5):
        s = got[j]["score"]
        assert s["judge"].startswith("openai:") and s["held_out"] == "episodes"
        for method, key in KEYS:
            res = s["methods"][method]
            mine, chance, bar = res[key], res["baselines"]["shuffled"][key], res["baselines"]["strongest_metric"][key]
            assert res["unanswered"] == 0 and res["n"] >= 30, (j, method)
            if j in PLANTED:
                assert mine["value"] > (0.85 if key != "correlation" else 0.6), (j, method, mine)
                assert mine["ci"][0] > chance["ci"][1] and mine["ci"][0] > bar["value"] and res["above_baselines"], (j, method)
            else:
                assert not res["above_baselines"] and mine["ci"][0] <= max(chance["ci"][1], bar["value"]), (j, method)
    # the planted pole-angle unit, explained wrongly: below the strongest-metric bar, which is right there
    det = got[2]["score"]["methods"]["detection"]
    assert det["baselines"]["strongest_metric"]["metric"] == "pole_angle"
    assert det["balanced_accuracy"]["ci"][1] < det["baselines"]["strongest_metric"]["balanced_accuracy"]["value"]


def test_the_rules_backend_finds_the_planted_units_on_the_same_run(store: Store) -> None:
    """With no LLM: the conjunction gets both its terms, the magnitude unit its |x|, noise no claim."""
    stream_cartpole(store)
    for j in range(5):
        file_job(store.r, "cp", "h:out", j, reason="test")
    Worker(store, consumer="w").run(burst=True)
    got = {e["latent"]: e for e in explanations(store.r, "cp")}
    assert [(c["metric"], c["op"]) for c in got[0]["conditions"]] == [("pole_angle", ">"), ("pole_angular_velocity", ">")]
    assert [(c["metric"], c["op"]) for c in got[1]["conditions"]] == [("cart_position", "abs>")]
    assert [(c["metric"], c["op"]) for c in got[2]["conditions"]] == [("pole_angle", ">")]
    assert got[3]["conditions"] == got[4]["conditions"] == []
    for j in PLANTED:
        assert all(got[j]["score"]["methods"][m]["above_baselines"] for m, _ in KEYS), j
    # the pole-angle tracker's explanation is the strongest metric itself: right, but no better than the bar
    assert not any(got[2]["score"]["methods"][m]["above_baselines"] for m, _ in KEYS)
