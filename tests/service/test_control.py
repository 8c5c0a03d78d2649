"""Live steering: the control channel's frames, its refusals, and steering a running agent end to end."""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq
from agents.steerable import OBS, TAP, make_policy, make_transcoder
from helpers import AGENT_DIR, ROOT, LiveMonitor, free_endpoint, spawn, spawn_monitor, wait_until

import agent_side
from agent_side import wire
from agent_side.steer import Intervention, from_transcoder
from agent_side.wire import WireError
from monitor.cli.common import Settings
from monitor.cli.steer import add_parsers
from monitor.service.steering import clear_interventions, set_interventions, steer_effects, steer_id
from monitor.store import keys
from monitor.store.records import ConfigError, Store
from monitor.transcoders.artifacts import save_artifact
from monitor.transcoders.training import artifact_info

OPT_IN = "did not opt in: attach(..., allow_control=True)"


# -- the frames ------------------------------------------------------------------------------------
def _ctl(event: dict) -> list[bytes]:
    return [bytes(p) for p in wire.encode_ctl("r", "p", 3, 1, event)]


def test_ctl_frame_round_trip() -> None:
    for ev in (
        {"event": "hello", "control": True, "version": -1},
        {
            "event": "applied",
            "id": "latents:tc/0",
            "op": "add",
            "tap": "1:out",
            "version": 4,
            "alpha": -1.5,
            "value": 0.0,
            "step": 12,
        },
        {"event": "refused", "reason": "bad_msgpack: unpack failed", "step": 3},
        {"event": "synced", "version": 4, "active": ["a", "b"], "step": 12},
    ):
        f = wire.decode(_ctl(ev))
        assert (f.kind, f.run, f.pub, f.seq, f.drops, f.event) == ("ctl", "r", "p", 3, 1, ev)
        assert f.rows == 0


@pytest.mark.parametrize(
    "event, reason",
    [
        ({"event": "exec", "id": "x"}, "bad_header"),
        ({"event": "applied", "cmd": "rm -rf /"}, "bad_header"),
        ({"event": "hello", "control": 1}, "bad_header"),  # an int is not a bool
        ({"event": "applied", "version": True}, "bad_header"),  # nor is a bool an int
        ({"event": "refused", "reason": "x" * 2000}, "bad_header"),
        ({"event": "applied", "alpha": math.nan}, "non_finite"),
        ({"event": "synced", "active": [1, 2]}, "bad_header"),
        ("applied", "bad_header"),
    ],
)
def test_ctl_frame_refuses_what_it_does_not_know(event: object, reason: str) -> None:
    with pytest.raises(WireError) as e:
        wire.decode(_ctl(event))  # type: ignore[arg-type]
    assert e.value.reason == reason
    with pytest.raises(WireError) as e:
        wire.decode([*_ctl({"event": "hello", "control": True}), b"extra"])
    assert e.value.reason == "bad_frame"


def _iv_msg(**over: object) -> dict:
    msg = Intervention("add", TAP, tuple([0.0] * 16), alpha=2.0, id="latents:tc/0").to_msg()
    msg.update(over)
    return msg


def _body(run: str, **over: object) -> bytes:
    body = {"v": 1, "kind": "steer", "run": run, "version": 3, "interventions": [_iv_msg()]}
    body.update(over)
    return msgpack.packb(body)


def test_control_message_round_trip_and_endpoints() -> None:
    parts = wire.encode_control("r", 7, [_iv_msg()])
    assert parts[0] == wire.control_topic("r") == b"r\0"
    msg = wire.decode_control(parts)
    assert (msg.run, msg.version) == ("r", 7)
    assert Intervention.from_msg(msg.interventions[0]) == Intervention.from_msg(_iv_msg())
    assert wire.control_endpoint("tcp://127.0.0.1:5557") == "tcp://127.0.0.1:5558"
    assert wire.control_endpoint("tcp://*:5557") == "tcp://*:5558"
    assert wire.control_endpoint("tcp://127.0.0.1:0") == "tcp://127.0.0.1:0"
    assert wire.control_endpoint("ipc:///tmp/il") == "ipc:///tmp/il.ctl"
    with pytest.raises(ValueError):
        wire.control_endpoint("tcp://127.0.0.1:65535")


# every way a control message can be wrong, with the reason the agent counts it under
MALFORMED = [
    ("bad_msgpack", lambda r: [wire.control_topic(r), b"\xc1\x00 not msgpack"]),
    ("version", lambda r: [wire.control_topic(r), _body(r, v=2)]),
    ("bad_header", lambda r: [wire.control_topic(r), _body(r, version="7")]),
    ("bad_header", lambda r: [wire.control_topic(r), _body(r, interventions={"op": "add"})]),
    ("bad_header", lambda r: [wire.control_topic(r), _body(r, exec="import os")]),
    ("bad_header", lambda r: [wire.control_topic(r), msgpack.packb([1, 2, 3])]),
    ("bad_header", lambda r: [wire.control_topic(r), _body("someone-else")]),
    ("bad_frame", lambda r: [wire.control_topic(r), _body(r), b"extra"]),
    ("oversized", lambda r: [wire.control_topic(r), b"\x00" * (wire.CONTROL_MAX_BYTES + 1)]),
    ("bad_intervention", lambda r: [wire.control_topic(r), _body(r, interventions=[_iv_msg(op="exec")])]),
    ("bad_intervention", lambda r: [wire.control_topic(r), _body(r, interventions=[_iv_msg(alpha=math.nan)])]),
    ("bad_intervention", lambda r: [wire.control_topic(r), _body(r, interventions=[_iv_msg(direction=["1"] * 16)])]),
    ("bad_intervention", lambda r: [wire.control_topic(r), _body(r, interventions=[_iv_msg(code="print(1)")])]),
    ("bad_intervention", lambda r: [wire.control_topic(r), _body(r, interventions=[_iv_msg(), _iv_msg()])]),  # the same id twice
]


@pytest.mark.parametrize("reason, build", MALFORMED[:9])
def test_decode_control_refuses_malformed_envelopes(reason: str, build) -> None:  # noqa: ANN001
    with pytest.raises(WireError) as e:
        wire.decode_control(build("r"))
    assert e.value.reason == reason


# -- the agent's end, in this process ---------------------------------------------------------------
def _pump(tap: agent_side.Attachment, pol: torch.nn.Module, cond, *, send=None, what: str, timeout_s: float = 20.0):  # noqa: ANN001
    """Step the policy (an agent loop) until ``cond()``, calling ``send()`` now and then."""
    obs = torch.randn(1, 4, generator=torch.Generator().manual_seed(0)) * 0.05
    deadline = time.monotonic() + timeout_s
    last_send = 0.0
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; counters {tap.counters()}")
        if send is not None and time.monotonic() - last_send > 0.2:
            send()
            last_send = time.monotonic()
        with torch.no_grad():
            pol(obs)
        tap.advance()
        time.sleep(0.005)


def test_malformed_control_messages_are_refused_counted_and_the_agent_keeps_stepping(
    store: Store, live_monitor: LiveMonitor
) -> None:
    run = "ctl-inproc"
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)  # a control socket of this test's own, proving a key the agent is given
    pub.setsockopt(zmq.LINGER, 0)
    public, secret = zmq.curve_keypair()
    pub.curve_server, pub.curve_publickey, pub.curve_secretkey = True, public, secret
    ctl_ep = free_endpoint()
    pub.bind(ctl_ep)
    pol, clean = make_policy(), make_policy()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    reports: list = []

    def collect() -> None:  # the agent's reports come back on this connection; the monitor's channel records them
        while pub.poll(0):
            parts = pub.recv_multipart()
            if parts[0][:1] not in (b"\x00", b"\x01"):
                reports.append(wire.decode(parts))

    try:
        with agent_side.attach(
            pol, [TAP], run=run, endpoint=live_monitor.endpoint, allow_control=True, control_endpoint=ctl_ep, monitor_key=public
        ) as tap:
            assert tap.wait_for_monitor(10)
            # a valid, empty set first: once the agent holds it, the subscription is through and nothing is lost
            _pump(
                tap,
                pol,
                lambda: tap.counters()["control_version"] == 1,
                send=lambda: pub.send_multipart(wire.encode_control(run, 1, [])),
                what="the first control message",
            )
            for _, build in MALFORMED:
                pub.send_multipart(build(run))
            expected: dict[str, int] = {}
            for reason, _ in MALFORMED:
                expected[reason] = expected.get(reason, 0) + 1
            _pump(tap, pol, lambda: tap.counters()["control_refused"] >= len(MALFORMED), what="every malformed message refused")
            c = tap.counters()
            assert c["control_refused_by"] == expected and c["control_version"] == 1 and c["control_active"] == 0
            with torch.no_grad():
                assert torch.equal(pol(x), clean(x))  # nothing was put on the model

            # a steer that does not fit its tap's width: refused before it goes on (1:out is streamed, 16 wide)
            narrow = Intervention("add", TAP, (1.0,) * 5, alpha=50.0, id="narrow").to_msg()
            pub.send_multipart(wire.encode_control(run, 2, [narrow]))
            _pump(tap, pol, lambda: tap.counters()["control_version"] == 2, what="version 2")
            assert tap.counters()["control_refused_by"].get("cannot_apply") == 1 and tap.counters()["control_active"] == 0
            # and one whose tap's width only shows at a forward (a ReLU's input): applied, then refused there, harmlessly
            hidden = Intervention("add", "1:in", (1.0,) * 5, alpha=50.0, id="hidden").to_msg()
            pub.send_multipart(wire.encode_control(run, 3, [hidden]))
            _pump(
                tap, pol, lambda: tap.counters()["control_refused_by"].get("forward_error") == 1, what="the forward-time refusal"
            )
            with torch.no_grad():
                assert torch.equal(pol(x), clean(x))
            assert tap.counters()["control_active"] == 0

            # a good steer goes on, and off again with the next (empty) set
            good = from_transcoder(make_transcoder(), 0, tap=TAP, op="add", alpha=50.0).to_msg()
            pub.send_multipart(wire.encode_control(run, 4, [good]))
            _pump(tap, pol, lambda: tap.counters()["control_active"] == 1, what="the good steer")
            with torch.no_grad():
                assert (pol(x).argmax(1) == 1).all() and not (clean(x).argmax(1) == 1).all()
            pub.send_multipart(wire.encode_control(run, 5, []))
            _pump(tap, pol, lambda: tap.counters()["control_version"] == 5, what="the empty set")
            with torch.no_grad():
                assert torch.equal(pol(x), clean(x))
            steps = tap.counters()["step"]
        assert steps > 0
        wait_until(lambda: collect() or any(r.event["event"] == "reverted" for r in reports), what="the reports")
        for r in reports:
            live_monitor.monitor.control.on_event(r)
        events = store.steer_events(run)
        refusals = [e for e in events if e["event"] == "refused"]
        assert any("5 entries" in e["reason"] and "16 wide" in e["reason"] for e in refusals if e.get("id") == "narrow")
        assert any(e.get("id") == "hidden" for e in refusals)
        assert any(e.get("reason") and "id" not in e for e in refusals)  # a malformed message, with its reason
        assert [e["event"] for e in events if e.get("id") == good["id"]] == ["applied", "reverted"]
        alerts = [a for a in store.alerts(run) if a["rule"] == "steering"]
        assert {a["state"] for a in alerts} == {"applied", "reverted", "refused"}
        applied = next(a for a in alerts if a["state"] == "applied" and a["steer"]["id"] == good["id"])
        assert (
            applied["kind"] == "steer"
            and applied["severity"] == "info"
            and applied["latent"] == 0
            and "alpha=+50" in applied["text"]
        )
        mon = live_monitor.finish()
        assert not mon.rejected  # ctl frames count in the sequence like any other: no gaps, no stale frames
        assert store.status()["runs"][0]["gaps"] == 0
    finally:
        pub.close()


def test_wanted_sets_keep_order_and_count_versions(store: Store) -> None:
    a, b = _iv_msg(id="a"), _iv_msg(id="b")
    assert set_interventions(store.r, "r", [a]) == 1
    assert set_interventions(store.r, "r", [b]) == 2
    assert set_interventions(store.r, "r", [{**a, "alpha": 3.0}]) == 3  # replaced by id, moved last
    assert [(m["id"], m["alpha"]) for m in store.steering("r")["interventions"]] == [("b", 2.0), ("a", 3.0)]
    assert clear_interventions(store.r, "r", ["b"]) == 4
    assert [m["id"] for m in store.steering("r")["interventions"]] == ["a"]
    assert clear_interventions(store.r, "r") == 5
    st = store.steering("r")
    assert st["interventions"] == [] and st["control"] is None and st["applied_version"] == -1


# -- end to end: a monitor and an agent in their own processes ---------------------------------------


class _Agent:
    """The steerable agent in a subprocess; its per-step actions read as they come."""

    def __init__(self, endpoint: str, run: str, tmp: Path, *extra: str) -> None:
        self.stop_file = tmp / f"{run}.stop"
        self.proc = spawn(
            [str(AGENT_DIR / "steerable.py"), "--endpoint", endpoint, "--run", run, "--stop-file", str(self.stop_file), *extra],
            stdout=subprocess.PIPE,
            stderr=open(tmp / f"{run}.log", "w"),
            text=True,
        )
        self.rows: list[dict] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.rows.append(json.loads(line))
            except ValueError:
                pass

    def actions(self, since: int = 0, until: int = 1 << 62) -> list[int]:
        return [r["action"] for r in list(self.rows) if "action" in r and since <= r["step"] < until]

    def last_step(self) -> int:
        steps = [r["step"] for r in list(self.rows) if "step" in r]
        return steps[-1] if steps else -1

    def stop(self) -> dict:
        self.stop_file.touch()
        assert self.proc.wait(timeout=30) == 0
        self.reader.join(timeout=10)  # every line read
        return next(r for r in reversed(self.rows) if r.get("done"))


def _steer(redis_url: str, *argv: str) -> tuple[int, str, str]:
    """`interlatent steer ARGV` as the CLI runs it (cli.main turns a ConfigError into exit status 2)."""
    p = argparse.ArgumentParser(prog="interlatent")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--redis")
        sp.add_argument("--data-dir")

    add_parsers(sub, common)
    args = p.parse_args(["steer", "--redis", redis_url, *argv])
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = args.fn(args, Settings.from_args(args))
        except ConfigError as e:
            print(f"interlatent: {e}", file=sys.stderr)
            rc = 2
    return rc, out.getvalue(), err.getvalue()


def _drain(proc: subprocess.Popen) -> list[bytes]:
    lines: list[bytes] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return lines


def _register(store: Store, tmp: Path, run: str) -> str:
    path = save_artifact(tmp / "tc", make_transcoder(), source=TAP, target=TAP, run=run)
    store.register_transcoder(artifact_info("steer-tc", path, make_transcoder(), run=run, source=TAP, target=TAP, q=None))
    return "steer-tc"


def test_steer_a_running_agent_end_to_end(store: Store, redis_url: str, tmp_path: Path) -> None:
    run = "steer-e2e"
    ep = free_endpoint()
    mon = spawn_monitor(redis_url, ep)
    log = _drain(mon)
    agent = None
    try:
        name = _register(store, tmp_path, run)
        agent = _Agent(ep, run, tmp_path, "--allow-control")
        wait_until(
            lambda: run in store.runs() and store.steering(run)["control"] is True and len(agent.actions()) >= 60,
            what="the agent's hello and some steps",
        )
        wait_until(lambda: store.steering(run)["applied_version"] == 0, what="the agent holding the (empty) published set")
        before = agent.actions()
        assert set(before) == {0, 1}, "the balancing policy pushes both ways"

        rc, out, err = _steer(redis_url, "--run", run, "--tap", TAP, "--latent", "0", "--alpha", "50")
        assert rc == 0, (out, err)
        applied = [e for e in store.steer_events(run) if e["event"] == "applied"]
        assert len(applied) == 1 and applied[0]["id"] == steer_id(name, 0) and applied[0]["op"] == "add"
        assert "applied" in out and steer_id(name, 0) in out
        s_on = applied[0]["step"]
        wait_until(lambda: agent.last_step() >= s_on + 40, what="40 steered steps")
        assert set(agent.actions(s_on, s_on + 40)) == {1}, "every action after the applied event is pushed one way"
        assert set(agent.actions(0, s_on)) == {0, 1}
        st = store.steering(run)
        assert st["active"] == [steer_id(name, 0)] and st["applied_version"] == st["version"] == 1

        rc, out, err = _steer(redis_url, "--run", run, "--clear")
        assert rc == 0, (out, err)
        reverted = [e for e in store.steer_events(run) if e["event"] == "reverted"]
        assert len(reverted) == 1 and "reverted" in out
        s_off = reverted[0]["step"]
        assert s_off >= s_on + 40
        wait_until(lambda: agent.last_step() >= s_off + 60, what="60 steps after the revert")
        assert set(agent.actions(s_off, s_off + 60)) == {0, 1}, "after the revert the policy balances again"
        assert store.steering(run)["active"] == []
        # the episode returns show it: pushed one way, the pole falls within a few dozen steps
        wait_until(lambda: steer_effects(store, run)[0]["during"]["episodes"] >= 2, what="episodes that ended while steered")
        (ef,) = steer_effects(store, run)
        assert (ef["applied_step"], ef["reverted_step"]) == (s_on, s_off)
        steered = [e["return"] for e in store.episodes(run) if s_on <= e["step"] < s_off][1:]  # the first began unsteered
        assert steered and max(steered) < 30
        alerts = [(a["state"], a["step"]) for a in store.alerts(run) if a["rule"] == "steering"]
        assert alerts == [("applied", s_on), ("reverted", s_off)]

        # a steer the agent cannot take (a direction of the wrong width, from a transcoder of another tap width) is refused
        store.register_transcoder(
            {
                **artifact_info(
                    "wide",
                    save_artifact(tmp_path / "wide", make_wide(), source="0:out", target=TAP, run=run),
                    make_wide(),
                    run=run,
                    source="0:out",
                    target=TAP,
                    q=None,
                )
            }
        )
        rc, out, err = _steer(redis_url, "--run", run, "--transcoder", "wide", "--latent", "0", "--alpha", "1")
        assert rc == 2 and "8 wide" in err and "16 wide" in err  # caught before it is sent: the run streams the tap
        counters = agent.stop()
        assert counters["control"] is True and counters["control_refused"] == 0 and counters["control_active"] == 0
    finally:
        if agent is not None and agent.proc.poll() is None:
            agent.proc.kill()
        mon.terminate()
        mon.wait(timeout=20)
    assert not any(b"Traceback" in line for line in log), b"".join(log)[-3000:]


def make_wide():  # noqa: ANN201
    from monitor.transcoders.model import Transcoder

    torch.manual_seed(3)
    return Transcoder(4, 2, 8)


def test_an_agent_without_the_opt_in_refuses(store: Store, redis_url: str, tmp_path: Path) -> None:
    run = "steer-no-opt-in"
    ep = free_endpoint()
    mon = spawn_monitor(redis_url, ep)
    _drain(mon)
    agent = None
    try:
        _register(store, tmp_path, run)
        agent = _Agent(ep, run, tmp_path)
        wait_until(
            lambda: run in store.runs() and store.steering(run)["control"] is False and len(agent.actions()) >= 30,
            what="the agent's hello (no control) and some steps",
        )
        rc, out, err = _steer(redis_url, "--run", run, "--tap", TAP, "--latent", "0", "--alpha", "50")
        assert rc == 2 and f"run {run}'s agent {OPT_IN}" in err
        assert store.steering(run)["interventions"] == [] and store.steer_events(run) == []
        # even a wanted set written behind the command's back is never sent to it
        set_interventions(store.r, run, [from_transcoder(make_transcoder(), 0, tap=TAP, op="add", alpha=50.0).to_msg()])
        mark = agent.last_step()
        wait_until(lambda: agent.last_step() >= mark + 60, what="60 more steps")
        assert set(agent.actions(mark)) == {0, 1}
        counters = agent.stop()
        assert counters["control"] is False and "control_refused" not in counters
        assert store.steer_events(run) == [] and store.steering(run)["applied_version"] == -1
    finally:
        if agent is not None and agent.proc.poll() is None:
            agent.proc.kill()
        mon.terminate()
        mon.wait(timeout=20)


def _stepper(env, pol: torch.nn.Module):  # noqa: ANN001, ANN202
    """``steps(n)`` runs the policy n env steps and returns the actions it took."""
    obs, _ = env.reset(seed=0)

    def steps(n: int) -> list[int]:
        nonlocal obs
        taken = []
        for _ in range(n):
            with torch.no_grad():
                a = int(pol(torch.as_tensor(obs)[None]).argmax())
            taken.append(a)
            obs, _, term, trunc, _ = env.step(a)
            if term or trunc:
                obs, _ = env.reset()
            time.sleep(0.002)
        return taken

    return steps


@pytest.mark.timeout(180)
def test_the_panel_steers_an_opted_in_agent(
    store: Store, redis_url: str, live_monitor: LiveMonitor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gymnasium as gym

    testing = pytest.importorskip("streamlit.testing.v1")
    run = "steer-panel"
    name = _register(store, tmp_path, run)
    pol = make_policy()
    with agent_side.attach(
        pol,
        [TAP],
        run=run,
        endpoint=live_monitor.endpoint,
        allow_control=True,
        control_endpoint=live_monitor.monitor.control.endpoint,
        monitor_key=live_monitor.monitor.control.public_key,
    ) as tap:
        assert tap.wait_for_monitor(10)
        steps = _stepper(tap.wrap(gym.make("CartPole-v1"), obs_names=OBS), pol)
        deadline = time.monotonic() + 30
        while store.steering(run)["control"] is not True or f"latents:{name}" not in store.taps(run):
            assert time.monotonic() < deadline, "no hello, or the monitor never encoded the tap"
            steps(5)
        assert set(steps(40)) == {0, 1}
        monkeypatch.setenv("INTERLATENT_REDIS_URL", redis_url)
        at = testing.AppTest.from_file(str(ROOT / "monitor" / "panel" / "app.py"), default_timeout=60)
        at.query_params.update(page="Latents", run=run, tap=f"latents:{name}", latent="0")
        at.run()
        at.number_input(key="steer_alpha").set_value(50.0)
        at.button(key="steer_apply").click().run()
        assert not at.exception and "asked the agent to add" in at.success[0].value
        while tap.counters()["control_active"] != 1:
            assert time.monotonic() < deadline, "the panel's steer never arrived"
            steps(1)
        assert set(steps(40)) == {1}  # latent 0's decoder row pushes every action to 1
        at.button(key="steer_clear").click().run()
        while tap.counters()["control_active"] != 0:
            assert time.monotonic() < deadline, "clearing from the panel never arrived"
            steps(1)
        assert set(steps(40)) == {0, 1}
        at.run()
        (table,) = [d.value for d in at.dataframe if "mean return on" in d.value.columns]
        assert table["steer"].tolist() == [f"latents:{name}/0"]  # the panel shows the steer's effect on returns
    assert [e["event"] for e in store.steer_events(run) if e["event"] != "synced"][-2:] == ["applied", "reverted"]


def test_the_action_metric_the_monitor_keeps_shows_the_steer(store: Store, live_monitor: LiveMonitor) -> None:
    """What the panel and the live correlations read: the run's action metric, steered from the applied step."""
    import gymnasium as gym

    run = "steer-metrics"
    pol = make_policy()
    with agent_side.attach(
        pol,
        [TAP],
        run=run,
        endpoint=live_monitor.endpoint,
        allow_control=True,
        control_endpoint=live_monitor.monitor.control.endpoint,
        monitor_key=live_monitor.monitor.control.public_key,
    ) as tap:
        assert tap.wait_for_monitor(10)
        env = tap.wrap(gym.make("CartPole-v1"), obs_names=OBS)
        steps = _stepper(env, pol)
        deadline = time.monotonic() + 20
        while store.steering(run)["control"] is not True or tap.counters()["control_version"] != 0:
            assert time.monotonic() < deadline, "no hello or first set"
            steps(5)
        set_interventions(store.r, run, [from_transcoder(make_transcoder(), 0, tap=TAP, op="add", alpha=50.0).to_msg()])
        while tap.counters()["control_active"] != 1:
            assert time.monotonic() < deadline, "the steer never arrived"
            steps(1)
        on = tap.step
        steps(100)
        tap.flush()
    wait_until(
        lambda: (
            store.recent_metrics(run).get("action") is not None and store.recent_metrics(run)["action"][1][:, 0].max() >= on + 99
        ),
        what="the steered steps' metrics",
    )
    values, pos = store.recent_metrics(run)["action"]
    assert set(np.unique(values[pos[:, 0] >= on])) == {1.0}
    assert set(np.unique(values[pos[:, 0] < on])) == {0.0, 1.0}


def test_steer_effects_compare_the_returns_while_on_with_those_before(store: Store, redis_url: str) -> None:
    """The episodes that ended while a steer was on, beside those since the previous change, from
    what the monitor stored of the agent's episode and ctl frames."""
    from monitor.service.ingest import Monitor

    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", control_endpoint="tcp://127.0.0.1:0")
    seq = iter(range(100))
    applied = {"event": "applied", "id": "latents:tc/0", "op": "add", "tap": TAP, "version": 1, "alpha": 2.0, "value": 0.0}

    def ep(step: int, ret: float) -> list:
        return wire.encode_ep("fx", "p", next(seq), 0, [[step, 0, ret, ret, 1.0, 0.0]])

    try:
        frames = [
            ep(20, 100),
            ep(50, 110),
            ep(90, 90),
            wire.encode_ctl("fx", "p", next(seq), 0, {**applied, "step": 100}),
            ep(120, 10),
            ep(150, 12),
            ep(190, 11),
            wire.encode_ctl("fx", "p", next(seq), 0, {**applied, "event": "reverted", "version": 2, "step": 200}),
            ep(260, 95),
            # a re-steer (reverted and applied at one step), then dropped by the agent (refused)
            wire.encode_ctl("fx", "p", next(seq), 0, {**applied, "version": 3, "step": 300}),
            ep(330, 20),
            wire.encode_ctl("fx", "p", next(seq), 0, {**applied, "event": "reverted", "version": 4, "step": 360}),
            wire.encode_ctl("fx", "p", next(seq), 0, {**applied, "version": 4, "alpha": 3.0, "step": 360}),
            ep(380, 30),
            wire.encode_ctl(
                "fx",
                "p",
                next(seq),
                0,
                {
                    "event": "refused",
                    "id": "latents:tc/0",
                    "op": "add",
                    "tap": TAP,
                    "version": 4,
                    "reason": "failed at a forward",
                    "step": 400,
                },
            ),
            ep(450, 99),
        ]
        for parts in frames:
            frame = wire.decode([bytes(p) for p in parts])
            if frame.kind == "ctl":  # an agent's report comes over its authenticated control connection
                mon.control.on_event(frame)
            else:
                assert mon.handle([bytes(p) for p in parts])
        mon.flush(final=True)
    finally:
        mon.close()
    ef, second, third = steer_effects(store, "fx")
    assert (second["applied_step"], second["reverted_step"], second["during"]["episodes"]) == (300, 360, 1)
    assert (third["applied_step"], third["reverted_step"]) == (360, 400)  # ended by the agent's refusal
    assert third["before"] == {"episodes": 1, "mean_return": 20.0} and third["during"] == {"episodes": 1, "mean_return": 30.0}
    assert (ef["applied_step"], ef["reverted_step"]) == (100, 200)
    assert ef["before"] == {"episodes": 3, "mean_return": 100.0} and ef["during"] == {"episodes": 3, "mean_return": 11.0}
    d = ef["difference"]
    assert d["mean"] == -89.0 and d["ci"][1] < 0 and d["p_value"] < 0.01
    rc, out, err = _steer(redis_url, "--run", "fx")
    assert rc == 0, err
    assert (
        "latents:tc/0 (add, steps 100-200): mean return 11.0 over 3 episodes ended while on, 100.0 over 3 before; difference -89.0"
        in out
    )


def test_a_steer_that_fails_at_a_forward_leaves_it_unchanged_and_comes_off() -> None:
    pol = make_policy()
    clean = copy.deepcopy(pol)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    errors: list[Exception] = []
    s = Intervention("add", "1:in", (1.0,) * 3, alpha=1.0, id="x").apply(pol, on_error=errors.append)
    with torch.no_grad():
        assert torch.equal(pol(x), clean(x)) and torch.equal(pol(x), clean(x))
    assert len(errors) == 1 and "3 entries" in str(errors[0]) and not s.active


def test_steer_finds_the_transcoder_that_writes_the_tap_or_says_which_to_use(store: Store, tmp_path: Path) -> None:
    from monitor.service.steering import build_intervention

    run = "resolve"
    _register(store, tmp_path, run)  # steer-tc: 1:out -> 1:out
    wide = make_wide()
    store.register_transcoder(
        artifact_info(
            "reader",
            save_artifact(tmp_path / "reader", wide, source="0:out", target="2:in", run=run),
            wide,
            run=run,
            source="0:out",
            target="2:in",
            q=None,
        )
    )

    def args(**kw: object) -> dict[str, object]:
        return {"tap": TAP, "latent": 0, "transcoder": None, "op": "add", "alpha": 1.0, "value": None, **kw}

    msg = build_intervention(store, run, **args())
    assert (msg["id"], msg["tap"], msg["op"], msg["alpha"]) == (steer_id("steer-tc", 0), TAP, "add", 1.0)
    msg = build_intervention(store, run, **args(op="clamp", alpha=None, value=0.5, latent=2))
    iv = Intervention.from_msg(msg)
    assert iv.op == "clamp" and iv.value == 0.5 and len(iv.w_enc) == 16 and iv.source is None  # an SAE reads its own tap
    with pytest.raises(ConfigError, match="reader reads '0:out' and writes '2:in'"):
        build_intervention(store, run, **args(tap="0:out"))
    with pytest.raises(ConfigError, match="steer-tc"):
        build_intervention(store, run, **args(tap="9:out"))
    with pytest.raises(ConfigError, match="writes '2:in'.*pass --tap 2:in"):
        build_intervention(store, run, **args(transcoder="reader"))
    with pytest.raises(ConfigError, match="latent must be an int in"):
        build_intervention(store, run, **args(latent=3))
    with pytest.raises(ConfigError, match="needs --value"):
        build_intervention(store, run, **args(op="clamp", alpha=None))
    msg = build_intervention(store, run, **args(transcoder="reader", tap=None, op="clamp", alpha=None, value=1.0))
    assert msg["tap"] == "2:in" and msg["source"] == "0:out" and len(msg["w_enc"]) == 4 and len(msg["direction"]) == 8


def test_a_run_is_steered_through_whichever_monitor_of_a_tier_serves_it(store: Store, redis_url: str, tmp_path: Path) -> None:
    from agent_side.routing import rendezvous

    run = "steer-tier"
    eps = [free_endpoint(), free_endpoint()]
    first, second = rendezvous(run, eps)
    mons = {ep: spawn_monitor(redis_url, ep, "--lease-s", "1") for ep in eps}
    logs = {ep: _drain(m) for ep, m in mons.items()}
    agent = None
    try:
        wait_until(lambda: len([h for h in store.health() if h.get("kind") == "monitor"]) == 2, what="both monitors up")
        idents = {h["endpoint"]: h["id"] for h in store.health() if h.get("kind") == "monitor"}
        name = _register(store, tmp_path, run)
        agent = _Agent(",".join(eps), run, tmp_path, "--allow-control")
        wait_until(
            lambda: store.steering(run)["control"] is True and store.steering(run)["applied_version"] == 0,
            what="the agent's opt-in, written by the monitor serving it",
        )
        assert store.r.hget(keys.run(run), "monitor").decode() == idents[first]
        rc, out, err = _steer(redis_url, "--run", run, "--tap", TAP, "--latent", "0", "--alpha", "50")
        assert rc == 0, (out, err)
        (applied,) = [e for e in store.steer_events(run) if e["event"] == "applied"]  # recorded once, not by both
        wait_until(lambda: agent.last_step() >= applied["step"] + 20, what="20 steered steps")
        assert set(agent.actions(applied["step"], applied["step"] + 20)) == {1}

        mons[first].kill()  # the serving monitor dies: the run, and its steering, go on at the other
        mons[first].wait()
        wait_until(lambda: store.r.hget(keys.run(run), "monitor").decode() == idents[second], timeout_s=30, what="the move")
        moved = agent.last_step()
        wait_until(lambda: agent.last_step() >= moved + 20, what="steps at the second monitor")
        assert set(agent.actions(moved, moved + 20)) == {1}  # still steered: the agent kept its set
        rc, out, err = _steer(redis_url, "--run", run, "--clear")
        assert rc == 0 and "reverted" in out, (out, err)
        (reverted,) = [e for e in store.steer_events(run) if e["event"] == "reverted"]
        wait_until(lambda: agent.last_step() >= reverted["step"] + 60, what="60 steps after the revert")
        assert set(agent.actions(reverted["step"], reverted["step"] + 60)) == {0, 1}
        assert store.steering(run)["active"] == [] and steer_id(name, 0) == applied["id"]
        counters = agent.stop()
        assert counters["failovers"] == 1 and counters["control_refused"] == 0
    finally:
        if agent is not None and agent.proc.poll() is None:
            agent.proc.kill()
        for m in mons.values():
            if m.poll() is None:
                m.terminate()
                m.wait(timeout=20)
    for ep in eps:
        assert not any(b"Traceback" in line for line in logs[ep]), b"".join(logs[ep])[-3000:]
