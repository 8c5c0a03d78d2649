"""Only the monitor can steer, and only agents that opted in, proven by keys: each forgery the
fault-injection run found, shown to fail. Real sockets, a real monitor, agents in this process
(the end-to-end run with processes is in test_control.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import torch
import zmq
from agents.steerable import TAP, make_policy, make_transcoder
from helpers import ROOT, free_endpoint, wait_until

import agent_side
from agent_side import wire
from agent_side.steer import from_transcoder
from monitor.service.curve import monitor_keypair
from monitor.service.ingest import Monitor
from monitor.service.steering import set_interventions
from monitor.store import keys
from monitor.store.records import Store

X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))


class _Mon:
    """A real Monitor with steering on (CURVE, its keypair made in ``data_dir``), loop in a thread."""

    def __init__(self, store: Store, data_dir: Path | None = None) -> None:
        self.monitor = Monitor(
            store, endpoint="tcp://127.0.0.1:0", control_endpoint="tcp://127.0.0.1:0", flush_ms=50, data_dir=data_dir
        )
        self.thread = threading.Thread(target=self.monitor.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.monitor.stop()
        self.thread.join(timeout=20)
        self.monitor.close()


def _steer_msg(alpha: float = 50.0) -> dict:
    return from_transcoder(make_transcoder(), 0, tap=TAP, op="add", alpha=alpha).to_msg()


def _pump(tap: agent_side.Attachment, pol: torch.nn.Module, cond, *, what: str, timeout_s: float = 20.0, send=None) -> None:  # noqa: ANN001
    """Run the agent's loop (a forward and a step) until ``cond()``."""
    obs = torch.zeros(1, 4)
    deadline = time.monotonic() + timeout_s
    last = 0.0
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}; counters {tap.counters()}"
        if send is not None and time.monotonic() - last > 0.1:
            send()
            last = time.monotonic()
        with torch.no_grad():
            pol(obs)
        tap.advance()
        time.sleep(0.005)


def _unchanged(pol: torch.nn.Module) -> bool:
    with torch.no_grad():
        return torch.equal(pol(X), make_policy()(X))


def test_forged_hellos_for_nul_names_are_refused_and_the_agent_applies_nothing(store: Store) -> None:
    """Before: hellos for op\\0v ... op\\0z on the data socket made the monitor publish their sets on
    topics op\\0v\\0 ..., which agent ``op``'s prefix subscription matched; it applied 7 sets."""
    live = _Mon(store)
    mon = live.monitor
    forger = zmq.Context.instance().socket(zmq.PUSH)
    forger.setsockopt(zmq.LINGER, 0)
    forger.connect(mon.endpoint)
    pol = make_policy()
    forged = [f"op\0{c}" for c in "vwxyz"]
    try:
        for i, run in enumerate(forged):
            set_interventions(store.r, run, [_steer_msg(10.0 * (i + 1))])  # what a steer for them would write
        with agent_side.attach(
            pol, [TAP], run="op", endpoint=mon.endpoint, allow_control=True,
            control_endpoint=mon.control.endpoint, monitor_key=mon.control.public_key,
        ) as tap:  # fmt: skip
            _pump(tap, pol, lambda: tap.counters()["control_version"] == 0, what="the agent's own (empty) set")
            seq = iter(range(10**6))

            def forge() -> None:
                for run in forged:
                    forger.send_multipart(wire.encode_ctl(run, "evil", next(seq), 0, {"event": "hello", "control": True}))

            published = mon.control.published
            _pump(
                tap,
                pol,
                lambda: mon.rejected.get("bad_name", 0) >= 20 and mon.control.published >= published + 3,
                send=forge,
                what="forged hellos refused while the monitor republishes",
            )
            c = tap.counters()
            assert (c["control_version"], c["control_active"], c["control_messages"]) == (0, 0, 1)
            assert _unchanged(pol)
            assert mon.control.opted == {"op"} and set(mon.runs) == {"op"}
    finally:
        forger.close()
        live.close()


def test_a_forged_hello_or_synced_on_the_data_socket_opts_no_run_in(store: Store, redis_url: str) -> None:
    """Before: a hello with control=true on the data socket made `steer` accept a run whose agent
    never opted in, and a forged synced made `steer --json` report a steer active."""
    live = _Mon(store)
    mon = live.monitor
    forger = zmq.Context.instance().socket(zmq.PUSH)
    forger.setsockopt(zmq.LINGER, 0)
    forger.connect(mon.endpoint)
    pol = make_policy()
    try:
        with agent_side.attach(pol, [TAP], run="victim", endpoint=mon.endpoint) as tap:  # no allow_control
            _pump(tap, pol, lambda: store.steering("victim")["control"] is False, what="the agent's own hello: no control")
            frames = [
                wire.encode_ctl("victim", "evil", 0, 0, {"event": "hello", "control": True, "version": -1}),
                wire.encode_ctl("victim", "evil", 1, 0, {"event": "synced", "version": 7, "active": ["latents:tc/0"]}),
            ]
            for parts in frames:
                forger.send_multipart(parts)
            _pump(tap, pol, lambda: store.r.hget(keys.run_pubs("victim"), "evil"), what="the forged frames taken and written")
            beat = store.health()[0]["time"]
            _pump(tap, pol, lambda: store.health()[0]["time"] != beat, what="one more flush")
            st = store.steering("victim")
            assert st["control"] is False and st["active"] == [] and st["applied_version"] == -1
            assert "victim" not in mon.control.opted
    finally:
        forger.close()
        live.close()
    out = subprocess.run(
        [sys.executable, "-m", "monitor", "steer", "--redis", redis_url, "--run", "victim", "--tap", TAP, "--latent", "0"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "did not opt in" in out.stderr


def test_a_squatter_on_the_control_port_is_never_listened_to(store: Store, tmp_path: Path) -> None:
    """Before: with the control port taken, the squatter's steer was applied by an opted-in agent
    (for 16,119 steps). Now the agent holds the monitor's public key: a plain socket, and a CURVE
    socket with any other key, fail its handshake; it counts them and applies nothing."""
    public, _ = monitor_keypair(tmp_path)  # the key the agent is given: the real monitor's
    ctx = zmq.Context.instance()
    plain = ctx.socket(zmq.XPUB)
    other = ctx.socket(zmq.XPUB)
    other_pub, other_sec = zmq.curve_keypair()
    other.curve_server, other.curve_publickey, other.curve_secretkey = True, other_pub, other_sec
    eps = []
    for s in (plain, other):
        s.setsockopt(zmq.LINGER, 0)
        eps.append(free_endpoint())
        s.bind(eps[-1])
    live = _Mon(store)
    try:
        for sock, ep in zip((plain, other), eps, strict=True):
            pol = make_policy()
            with agent_side.attach(
                pol, [TAP], run="sq", endpoint=live.monitor.endpoint, allow_control=True,
                control_endpoint=ep, monitor_key=str(tmp_path / "curve" / "monitor.key"),
            ) as tap:  # fmt: skip
                _pump(
                    tap,
                    pol,
                    lambda tap=tap: tap.counters()["control_unproven"] >= 1,
                    send=lambda sock=sock: sock.send_multipart(wire.encode_control("sq", 1, [_steer_msg()])),
                    what="handshakes that could not prove the key",
                )
                c = tap.counters()
                assert (c["control_version"], c["control_active"], c["control_messages"]) == (-1, 0, 0)
                assert _unchanged(pol)
    finally:
        plain.close()
        other.close()
        live.close()


def test_a_subscriber_without_the_key_reads_no_steering_set(store: Store) -> None:
    """Before: any local SUB read every steering set. Now a plain SUB, and a CURVE client that
    does not know the monitor's key, get nothing while the opted-in agent gets its set."""
    live = _Mon(store)
    mon = live.monitor
    ctx = zmq.Context.instance()
    plain = ctx.socket(zmq.SUB)
    wrong = ctx.socket(zmq.SUB)
    wrong.curve_serverkey = zmq.curve_keypair()[0]
    wrong.curve_publickey, wrong.curve_secretkey = zmq.curve_keypair()
    for s in (plain, wrong):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.connect(mon.control.endpoint)
    pol = make_policy()
    try:
        set_interventions(store.r, "reader", [_steer_msg()])
        with agent_side.attach(
            pol, [TAP], run="reader", endpoint=mon.endpoint, allow_control=True,
            control_endpoint=mon.control.endpoint, monitor_key=mon.control.public_key,
        ) as tap:  # fmt: skip
            _pump(tap, pol, lambda: tap.counters()["control_active"] == 1, what="the agent's steer")
            published = mon.control.published
            _pump(tap, pol, lambda: mon.control.published >= published + 3, what="three more publications")
            assert not _unchanged(pol)
        assert plain.poll(0) == 0 and wrong.poll(0) == 0
    finally:
        plain.close()
        wrong.close()
        live.close()


def test_the_agent_checks_a_message_run_exactly(store: Store) -> None:
    """A control message is the agent's only if its run is the agent's, exactly: one on a topic the
    subscription matches by prefix is refused, counted, and applies nothing."""
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    public, secret = zmq.curve_keypair()
    pub.curve_server, pub.curve_publickey, pub.curve_secretkey = True, public, secret
    ep = free_endpoint()
    pub.bind(ep)
    live = _Mon(store)
    pol = make_policy()
    try:
        with agent_side.attach(
            pol, [TAP], run="op", endpoint=live.monitor.endpoint, allow_control=True, control_endpoint=ep, monitor_key=public
        ) as tap:
            _pump(tap, pol, lambda: pub.poll(0) and b"op\0" in pub.recv(), what="the agent's subscription")
            # the topic begins with the agent's subscription b"op\0"; the run inside is another's
            body = {"v": 1, "kind": "steer", "run": "op\0v", "version": 1, "interventions": [_steer_msg()]}
            forged = [b"op\0v\0", msgpack.packb(body)]
            _pump(
                tap,
                pol,
                lambda: sum(tap.counters()["control_refused_by"].values()) >= 3,
                send=lambda: pub.send_multipart(forged),
                what="the forged messages refused",
            )
            c = tap.counters()
            assert set(c["control_refused_by"]) <= {"bad_name", "wrong_run"} and c["control_active"] == 0
            assert _unchanged(pol)
    finally:
        pub.close()
        live.close()


def test_a_taken_control_port_stops_the_monitor_in_one_line_unless_steering_is_off(redis_url: str, tmp_path: Path) -> None:
    """Before: the monitor only warned and ran on, leaving the port to the squatter."""
    ep = free_endpoint()
    port = int(ep.rsplit(":", 1)[1])
    squat = zmq.Context.instance().socket(zmq.PUB)
    squat.setsockopt(zmq.LINGER, 0)
    try:
        squat.bind(f"tcp://127.0.0.1:{port + 1}")
    except zmq.ZMQError:
        squat.close()
        return  # the port after a free one was taken already: nothing to show on this machine now
    base = [sys.executable, "-m", "monitor", "--log-level", "WARNING", "monitor", "--redis", redis_url, "--endpoint", ep]
    base += ["--data-dir", str(tmp_path), "--metrics-port", "-1", "--idle-exit-s", "0.5"]
    try:
        r = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith("interlatent: cannot bind the steering control endpoint") and "--no-steering" in line
        r = subprocess.run([*base, "--no-steering"], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
    finally:
        squat.close()


def test_the_monitor_keeps_its_keypair_in_its_data_dir(tmp_path: Path) -> None:
    first = monitor_keypair(tmp_path)
    assert monitor_keypair(tmp_path) == first  # made once, then read
    secret = tmp_path / "curve" / "monitor.key_secret"
    assert secret.stat().st_mode & 0o077 == 0 and (tmp_path / "curve").stat().st_mode & 0o077 == 0
    assert np.all([first[0].decode() in (tmp_path / "curve" / "monitor.key").read_text()])


def test_remote_agents_stream_only_with_an_allowed_key(store: Store, tmp_path: Path) -> None:
    """--allow-keys: the data channel is CURVE too, and ZAP lets in only the listed agents' keys."""
    import zmq.auth

    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir()
    other.mkdir()
    a_pub, a_secret = zmq.auth.create_certificates(str(allowed), "a")
    _, b_secret = zmq.auth.create_certificates(str(other), "b")
    Path(a_secret).rename(other / "a.key_secret")  # the monitor's folder holds public keys only
    a_secret = str(other / "a.key_secret")
    mon = Monitor(
        store, endpoint="tcp://127.0.0.1:0", control_endpoint="tcp://127.0.0.1:0", flush_ms=50,
        data_dir=tmp_path / "mon", allow_keys=allowed,
    )  # fmt: skip
    th = threading.Thread(target=mon.run, daemon=True)
    th.start()
    key = mon.control.public_key
    try:
        taps = {}
        for run, agent_key in (("a", a_secret), ("b", b_secret), ("plain", None)):
            model = torch.nn.Sequential(torch.nn.Linear(2, 2))
            with agent_side.attach(
                model, ["0:out"], run=run, endpoint=mon.endpoint, monitor_key=key, agent_key=agent_key, connect_wait_s=5
            ) as tap:
                for _ in range(20):
                    with torch.no_grad():
                        model(torch.zeros(1, 2))
                    tap.advance()
                taps[run] = tap.counters()
                if run == "b":  # its handshakes are refused (ZAP), each counted by the agent
                    wait_until(lambda tap=tap: tap.counters()["handshake_failures"] > 0, what="refused handshakes")
        assert taps["a"]["connected"] and taps["a"]["sent"] > 0, taps
        assert not taps["b"]["connected"] and taps["b"]["sent"] == 0 and taps["b"]["unwatched"] == 20
        assert not taps["plain"]["connected"] and taps["plain"]["sent"] == 0
        wait_until(
            lambda: "a" in store.runs() and store.taps("a").get("0:out", {}).get("rows") == 20, what=f"agent a rows {taps}"
        )
        assert set(store.runs()) == {"a"}
    finally:
        mon.stop()
        th.join(timeout=20)
        mon.close()


def test_an_ephemeral_data_port_is_one_whose_steering_port_is_free() -> None:
    """`tcp://127.0.0.1:0` picks a data port P; the steering channel binds P + 1 and a taken one
    stops the monitor, so P is chosen with P + 1 free."""
    import socket

    from monitor.service.ingest import _next_port_free

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        q = held.getsockname()[1]
        assert not _next_port_free(f"tcp://127.0.0.1:{q - 1}")
