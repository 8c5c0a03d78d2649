"""Routing over a tier of monitors: rendezvous order, failover down it and back, one publisher
throughout; real PULL sockets stand in for the monitors."""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter

import pytest
import torch
import zmq
from helpers import free_endpoint, spawn, wait_until

import agent_side
from agent_side import wire
from agent_side.routing import endpoints_from_env, parse_endpoints, rendezvous
from agent_side.wire import Frame

ENDPOINTS = ["tcp://10.0.0.1:5557", "tcp://10.0.0.2:5557", "tcp://10.0.0.3:5557", "tcp://10.0.0.4:5557", "ipc:///run/il/m5"]


# -- the order ----------------------------------------------------------------------------------
def test_removing_an_endpoint_moves_only_its_runs() -> None:
    runs = [f"run-{i}" for i in range(3000)]
    orders = {r: rendezvous(r, ENDPOINTS) for r in runs}
    share = Counter(o[0] for o in orders.values())
    assert set(share) == set(ENDPOINTS) and min(share.values()) > len(runs) / len(ENDPOINTS) * 0.8, share
    for gone in ENDPOINTS:
        rest = [e for e in ENDPOINTS if e != gone]
        moved = 0
        for r in runs:
            after = rendezvous(r, rest)
            assert after == [e for e in orders[r] if e != gone]  # the rest keep their order
            if orders[r][0] == gone:
                assert after[0] == orders[r][1]  # its runs go to their second choice
                moved += 1
            else:
                assert after[0] == orders[r][0]  # every other run stays where it was
        assert moved == share[gone]
    assert rendezvous("r", ENDPOINTS[::-1]) == rendezvous("r", ENDPOINTS)  # the list's order does not matter


def test_the_order_is_the_same_in_every_process() -> None:
    # pinned: a change of the hash would move every run of a deployed tier
    assert rendezvous("eval", ["tcp://m1:5557", "tcp://m2:5557", "tcp://m3:5557"]) == [
        "tcp://m2:5557",
        "tcp://m3:5557",
        "tcp://m1:5557",
    ]
    code = f"from agent_side.routing import rendezvous; print(rendezvous('cartpole-7', {ENDPOINTS!r}))"
    for seed in ("1", "2"):  # str hashes are salted per process; the order must not be
        p = spawn(["-c", code], stdout=subprocess.PIPE, env={"PYTHONHASHSEED": seed})
        out, _ = p.communicate(timeout=60)
        assert out.decode().strip() == repr(rendezvous("cartpole-7", ENDPOINTS))


# -- parsing --------------------------------------------------------------------------------------
def test_endpoint_lists_are_parsed_and_checked() -> None:
    assert parse_endpoints(" tcp://a:1 ,ipc:///tmp/x,  tcp://[::1]:5557 ") == ["tcp://a:1", "ipc:///tmp/x", "tcp://[::1]:5557"]
    assert parse_endpoints(["tcp://a:1", " tcp://b:2"]) == ["tcp://a:1", "tcp://b:2"]
    assert parse_endpoints("tcp://127.0.0.1:5557") == ["tcp://127.0.0.1:5557"]
    with pytest.raises(ValueError, match=r"item 2 of 'tcp://a:1,,tcp://b:2' is empty"):
        parse_endpoints("tcp://a:1,,tcp://b:2")
    with pytest.raises(ValueError, match=r"item 2 .* is empty"):
        parse_endpoints("tcp://a:1, ")
    for bad in ("tcp://a", "tcp://a:0", "tcp://a:65536", "tcp://*:5557", "http://a:1", "inproc://x", "a:1", "tcp://a:1/x"):
        with pytest.raises(ValueError, match=re.escape(f"{bad!r} is not an endpoint")):
            parse_endpoints(f"tcp://ok:1,{bad}")
    with pytest.raises(ValueError, match=r"'tcp://a:1' is listed twice"):
        parse_endpoints("tcp://a:1, tcp://a:1")
    with pytest.raises(ValueError, match="no endpoint"):
        parse_endpoints([])


def test_endpoints_from_the_environment() -> None:
    default = wire.DEFAULT_ENDPOINT
    assert endpoints_from_env(default, {}) == [default]
    assert endpoints_from_env(default, {"INTERLATENT_ENDPOINT": "tcp://one:1"}) == ["tcp://one:1"]
    both = {"INTERLATENT_ENDPOINTS": " tcp://a:1, tcp://b:2 ", "INTERLATENT_ENDPOINT": "tcp://one:1"}
    assert endpoints_from_env(default, both) == ["tcp://a:1", "tcp://b:2"]
    assert endpoints_from_env(default, {"INTERLATENT_ENDPOINTS": " ", "INTERLATENT_ENDPOINT": "tcp://one:1"}) == ["tcp://one:1"]
    with pytest.raises(ValueError, match=r"^\$INTERLATENT_ENDPOINTS: item 3 of 'tcp://a:1,tcp://b:2,' is empty"):
        endpoints_from_env(default, {"INTERLATENT_ENDPOINTS": "tcp://a:1,tcp://b:2,"})
    with pytest.raises(ValueError, match=r"^\$INTERLATENT_ENDPOINTS: 'tcp://b' is not an endpoint"):
        endpoints_from_env(default, {"INTERLATENT_ENDPOINTS": "tcp://a:1, tcp://b"})


def test_attach_refuses_a_bad_list_or_failover(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    monkeypatch.setenv("INTERLATENT_ENDPOINTS", "tcp://127.0.0.1:1,,tcp://127.0.0.1:2")
    with pytest.raises(ValueError, match=r"INTERLATENT_ENDPOINTS: item 2 .* is empty"):
        agent_side.attach(model, ["0:out"], run="bad")
    monkeypatch.delenv("INTERLATENT_ENDPOINTS")
    monkeypatch.setenv("INTERLATENT_FAILOVER_S", "soon")
    with pytest.raises(ValueError, match=r"\$INTERLATENT_FAILOVER_S must be a number of seconds, got 'soon'"):
        agent_side.attach(model, ["0:out"], run="bad", endpoint="tcp://127.0.0.1:1")


# -- real sockets ---------------------------------------------------------------------------------
class Tier:
    """PULL sockets bound where monitors would be; ``frames[endpoint]`` is what each received."""

    def __init__(self, n: int) -> None:
        self.ctx = zmq.Context()
        self.socks: dict[str, zmq.Socket] = {}
        self.endpoints: list[str] = []
        for _ in range(n):
            ep = free_endpoint()
            assert self.bind(ep)
            self.endpoints.append(ep)
        self.frames: dict[str, list[Frame]] = {ep: [] for ep in self.endpoints}

    def bind(self, ep: str) -> bool:
        sock = self.ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ep)
        except zmq.ZMQError:  # the port a socket just closed on may take a moment to come free
            sock.close()
            return False
        self.socks[ep] = sock
        return True

    def close(self, ep: str) -> None:
        self.socks.pop(ep).close(linger=0)

    def pump(self) -> None:
        for ep, sock in self.socks.items():
            while True:
                try:
                    parts = sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.frames[ep].append(wire.decode(parts))

    def acts(self, ep: str, since: int = 0) -> list[Frame]:
        self.pump()
        return [f for f in self.frames[ep][since:] if f.kind == "act"]

    def shut(self) -> None:
        for sock in self.socks.values():
            sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def tier():
    made: list[Tier] = []

    def make(n: int) -> Tier:
        made.append(Tier(n))
        return made[-1]

    yield make
    for t in made:
        t.shut()


def _model() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.ones(1, 4)


def _stream(tier: Tier, ep: str, model: torch.nn.Module, x: torch.Tensor, n: int, since: int = 0, what: str = "") -> list[Frame]:
    """Run forwards (one frame each, flush_rows=1) until ``ep`` has ``n`` activation frames."""

    def got() -> list[Frame]:
        model(x)
        acts = tier.acts(ep, since)
        return acts if len(acts) >= n else []

    return wait_until(got, timeout_s=20, what=what or f"{n} frames at {ep}")


def _is_hello(f: Frame) -> bool:
    return isinstance(f, wire.CtlFrame) and f.event["event"] == "hello"


def test_one_endpoint_string_is_one_socket_as_before(tier) -> None:
    t = tier(1)
    (ep,) = t.endpoints
    model, x = _model()
    with agent_side.attach(model, ["0:out"], run="solo", endpoint=ep, flush_rows=1, failover_s=0.3, connect_wait_s=5) as tap:
        assert tap.endpoints == [ep] and tap.endpoint == ep
        c = tap.counters()
        assert (c["target"], c["failovers"], c["connected"]) == (ep, 0, True)
        acts = _stream(t, ep, model, x, 3)
        assert _is_hello(t.frames[ep][0])  # the greeting comes first
        assert {f.pub for f in t.frames[ep]} == {c["pub"]}
        t.close(ep)
        wait_until(lambda: not tap.connected, what="the monitor gone")
        assert tap.counters()["target"] == ep  # for failover_s it stays the target
        wait_until(lambda: tap.counters()["target"] is None, what="no target once failover_s passed")
        before = len(t.frames[ep])
        wait_until(lambda: t.bind(ep), what="the port rebound")
        wait_until(lambda: tap.counters()["target"] == ep and tap.connected, what="the monitor back")
        later = _stream(t, ep, model, x, 2, since=before)
        assert _is_hello(t.frames[ep][before])
        assert tap.counters()["failovers"] == 0
        assert {f.pub for f in t.frames[ep]} == {c["pub"]}
        assert later[0].seq > acts[-1].seq


def test_failover_down_the_order_and_back(tier) -> None:
    t = tier(3)
    run = "shard-me"
    first, second, third = order = rendezvous(run, t.endpoints)
    model, x = _model()
    failover_s, settle_s = 1.0, 0.5
    with agent_side.attach(
        model, ["0:out"], run=run, endpoint=t.endpoints, flush_rows=1, failover_s=failover_s, connect_wait_s=5
    ) as tap:
        assert tap.endpoints == order
        pub = tap.counters()["pub"]
        acts = _stream(t, first, model, x, 5)
        t.pump()
        assert _is_hello(t.frames[first][0])
        # only the run's first choice hears from it, its hello included: no other monitor takes the run up
        assert t.frames[second] == t.frames[third] == []
        assert tap.counters()["failovers"] == 0

        t_close = time.monotonic()
        t.close(first)
        wait_until(lambda: not tap.connected, what="the first monitor gone")
        assert tap.counters()["target"] == first  # a blip does not move the run
        drops = tap.counters()["drops"]
        for i in range(5):
            tap.log(m=float(i))  # nowhere to go: dropped and counted
        assert tap.counters()["drops"] == drops + 5
        assert time.monotonic() - t_close < failover_s, "the checks above must run within the grace"

        wait_until(lambda: tap.counters()["target"] == second, what="the failover")
        assert time.monotonic() - t_close >= failover_s
        moved = _stream(t, second, model, x, 5)
        assert _is_hello(t.frames[second][0])  # the new target is greeted first
        assert tap.counters()["failovers"] == 1 and t.acts(third) == []
        assert {f.pub for f in t.frames[second]} == {pub}  # the same publisher, its seq going on
        assert moved[0].seq > acts[-1].seq and moved[-1].drops == drops + 5

        t_rebind = time.monotonic()
        since = len(t.frames[first])
        wait_until(lambda: t.bind(first), what="the first port rebound")
        wait_until(lambda: tap.counters()["target"] == first, what="the move back")
        assert time.monotonic() - t_rebind >= settle_s  # only once it stayed connected
        assert tap.counters()["failovers"] == 2
        switch = tap.counters()["sent"]  # every message from here on goes to the first again
        back = _stream(t, first, model, x, 3, since=since)
        assert _is_hello(t.frames[first][since])  # greeted on its new connection before any data
        assert back[-1].seq >= switch and all(f.seq < switch for f in t.acts(second))
        assert t.acts(third) == []

    seqs = [f.seq for e in order for f in t.frames[e]]
    assert len(seqs) == len(set(seqs))  # no number twice across the monitors
    for e in order:
        s = [f.seq for f in t.frames[e]]
        assert s == sorted(s) and {f.pub for f in t.frames[e]} == ({pub} if e != third else set())
    assert tap.counters()["drops"] == drops + 5  # nothing else went nowhere


def test_a_blip_shorter_than_failover_s_does_not_move_the_run(tier) -> None:
    t = tier(2)
    first, second = rendezvous("blip", t.endpoints)
    model, x = _model()
    with agent_side.attach(
        model, ["0:out"], run="blip", endpoint=t.endpoints, flush_rows=1, failover_s=10, connect_wait_s=5
    ) as tap:
        _stream(t, first, model, x, 2)
        since = len(t.frames[first])
        t.close(first)
        wait_until(lambda: not tap.connected, what="the monitor gone")
        wait_until(lambda: t.bind(first), what="the port rebound")
        wait_until(lambda: tap.connected, what="the monitor back")
        _stream(t, first, model, x, 2, since=since)
        c = tap.counters()
        assert (c["target"], c["failovers"]) == (first, 0)
        assert t.acts(second) == []


def test_a_first_choice_never_reached_counts_as_gone_since_attach(tier, monkeypatch: pytest.MonkeyPatch) -> None:
    t = tier(1)
    missing = free_endpoint()
    run = next(r for r in (f"r{i}" for i in range(100)) if rendezvous(r, [missing, t.endpoints[0]])[0] == missing)
    monkeypatch.setenv("INTERLATENT_ENDPOINTS", f" {t.endpoints[0]} , {missing} ")
    monkeypatch.setenv("INTERLATENT_FAILOVER_S", "0.5")
    model, x = _model()
    t0 = time.monotonic()
    with agent_side.attach(model, ["0:out"], run=run, flush_rows=1) as tap:
        assert tap.endpoints == [missing, t.endpoints[0]]
        wait_until(lambda: tap.counters()["target"] == t.endpoints[0], what="the failover")
        assert time.monotonic() - t0 >= 0.5
        assert tap.counters()["failovers"] == 1
        _stream(t, t.endpoints[0], model, x, 2)


@pytest.mark.parametrize("override", [False, True])
def test_control_connects_to_every_monitor(tier, override: bool) -> None:
    eps = [free_endpoint(), free_endpoint()]
    controls = [free_endpoint() for _ in eps] if override else [wire.control_endpoint(e) for e in eps]
    public, secret = zmq.curve_keypair()
    ctx = zmq.Context()
    xpubs = []
    try:
        for c in controls:
            s = ctx.socket(zmq.XPUB)
            s.setsockopt(zmq.LINGER, 0)
            s.curve_server, s.curve_secretkey = True, secret
            s.bind(c)
            xpubs.append(s)
        model, _ = _model()
        kw = {"control_endpoint": " , ".join(controls)} if override else {}
        with agent_side.attach(model, ["0:out"], run="steer-me", endpoint=eps, allow_control=True, monitor_key=public, **kw):
            sub = b"\x01" + wire.control_topic("steer-me")
            for s in xpubs:  # each monitor's XPUB sees the run's subscription (and the agent's reports)
                wait_until(
                    lambda s=s: s.poll(50) and s.recv_multipart()[0] == sub, what=f"the subscription at {s.last_endpoint!r}"
                )
    finally:
        for s in xpubs:
            s.close(linger=0)
        ctx.term()
