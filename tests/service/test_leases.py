"""One writer per run: two real monitors on one real Redis, fed frames directly (no sockets needed
to decide who may write)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import wait_until

from agent_side.wire import encode_act
from monitor.service.ingest import Monitor
from monitor.service.leases import lease_history
from monitor.store import keys
from monitor.store.records import Store


def _act(run: str, seq: int, step: int, pub: str = "p") -> list:
    data = np.full((1, 4), float(step), np.float32)
    return encode_act(run, pub, seq, 0, "h:out", data, np.array([[step, 0]], np.int64))


@pytest.fixture
def pair(store: Store):
    made = [Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False, lease_s=2.0) for _ in range(2)]
    yield made
    for m in made:
        m.close()


def test_a_run_is_served_by_the_monitor_holding_its_lease_and_refused_elsewhere(store: Store, pair: list[Monitor]) -> None:
    a, b = pair
    assert a.handle(_act("r", 0, 0))
    a.flush()
    assert not b.handle(_act("r", 1, 1))  # a holds r
    assert b.rejected["leased_elsewhere"] == 1 and "r" not in b.runs
    assert store.r.hget(keys.run("r"), "monitor").decode() == a.ident
    assert b.handle(_act("other", 0, 0))  # a run nobody holds
    events = [(e["run"], e["monitor"], e["event"]) for e in lease_history(store)]
    assert events == [("r", a.ident, "acquired"), ("other", b.ident, "acquired")]


def test_a_monitor_whose_lease_was_taken_writes_nothing_more_and_the_next_owner_continues(
    store: Store, pair: list[Monitor]
) -> None:
    a, b = pair
    for s in range(3):
        assert a.handle(_act("r", s, s))
    a.flush()
    assert a.handle(_act("r", 3, 3))  # received by a, never written: a gap for the next owner
    store.r.delete(keys.lease("r"))  # a's lease expired (it could not renew in time) ...
    assert b.handle(_act("r", 4, 4))  # ... and b took the run, restoring what a wrote
    b.flush()
    a.flush()  # a's write is refused whole: the lease is b's
    assert "r" not in a.runs and a.leases.counts["lost"] == 1 and "r" not in a.leases.held
    h = {k.decode(): v.decode() for k, v in store.r.hgetall(keys.run("r")).items()}
    assert h["monitor"] == b.ident
    assert (int(h["steps"]), int(h["frames"]), int(h["gaps"])) == (5, 4, 1)  # frames of steps 0-2 and 4; seq 3 a gap
    assert [e["event"] for e in lease_history(store, "r")] == ["acquired", "acquired", "lost"]


def test_an_expired_lease_nobody_took_is_taken_back_by_its_last_writer(store: Store, pair: list[Monitor]) -> None:
    a, b = pair
    assert a.handle(_act("r", 0, 0))
    a.flush()
    store.r.delete(keys.lease("r"))  # Redis was away longer than the TTL; nobody took the run
    assert a.handle(_act("r", 1, 1))
    a.flush()
    assert "r" in a.runs and store.r.get(keys.lease("r")).decode().endswith(a.ident)
    assert int(store.r.hget(keys.run("r"), "frames")) == 2


def test_a_quiet_run_another_monitor_asks_for_is_handed_over(store: Store, pair: list[Monitor]) -> None:
    a, b = pair
    assert a.handle(_act("r", 0, 0))
    a.flush()
    assert not b.handle(_act("r", 1, 1))  # the agent moved to b: b asks for the run
    assert store.r.zscore(keys.LEASES_WANTED, "r") is not None

    def moved() -> bool:
        a.flush()
        return "r" not in a.runs

    wait_until(moved, timeout_s=10, what="a to hand r over once it is quiet")
    b.leases._refused_until.clear()  # b asks again at its next frame, not after its back-off
    assert b.handle(_act("r", 2, 2))
    b.flush()
    h = {k.decode(): v.decode() for k, v in store.r.hgetall(keys.run("r")).items()}
    assert h["monitor"] == b.ident and int(h["frames"]) == 2 and int(h["gaps"]) == 1  # seq 1 was refused: a gap
    assert [(e["monitor"], e["event"]) for e in lease_history(store, "r")] == [
        (a.ident, "acquired"),
        (a.ident, "handed_over"),
        (b.ident, "acquired"),
    ]


def test_a_monitor_restarted_at_the_same_address_takes_its_runs_back_at_once(store: Store) -> None:
    a = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False, lease_s=60.0)
    endpoint = a.endpoint
    assert a.handle(_act("r", 0, 0))
    a.flush()
    a.leases.held.clear()  # as if killed: nothing given back, the lease lives on for a minute
    a.close_sockets()
    again = Monitor(store, endpoint=endpoint, steering=False, lease_s=60.0)
    try:
        assert again.handle(_act("r", 1, 1))  # its predecessor at this address is gone: no minute to wait
        again.flush()
        assert int(store.r.hget(keys.run("r"), "frames")) == 2
    finally:
        again.close()


def test_close_gives_the_leases_back(store: Store, pair: list[Monitor]) -> None:
    a, b = pair
    assert a.handle(_act("r", 0, 0))
    a.flush()
    a.close()
    assert not store.r.exists(keys.lease("r"))
    assert b.handle(_act("r", 1, 1))


def test_an_idle_run_keeps_its_lease_by_renewal_alone(store: Store) -> None:
    a = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False, lease_s=0.6, analytics=None)
    b = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False, lease_s=0.6, analytics=None)
    try:
        assert a.handle(_act("r", 0, 0))
        a.flush()
        written = store.r.hget(keys.run("r"), "last_seen")

        def renewed_past_the_ttl() -> bool:
            a.flush()
            return a.leases.counts["renewed"] >= 6  # a renewal every ttl/3: two TTLs and more

        wait_until(renewed_past_the_ttl, what="renewals over two lease lifetimes")
        assert not b.handle(_act("r", 1, 1))  # still a's
        assert store.r.hget(keys.run("r"), "last_seen") == written  # renewed without writing the state again
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("lease_s", [0.1, 1e300, float("nan"), float("inf"), -1.0])
def test_a_lease_that_cannot_outlive_its_renewals_or_outlives_a_day_is_refused(store: Store, lease_s: float) -> None:
    from monitor.store.records import ConfigError

    with pytest.raises(ConfigError, match="lease_s must be at least 3 flushes"):
        Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False, lease_s=lease_s)


def test_a_port_zeromq_would_wrap_is_refused(store: Store) -> None:
    from monitor.store.records import ConfigError

    with pytest.raises(ConfigError, match="port 99999 is not in 0-65535"):
        Monitor(store, endpoint="tcp://127.0.0.1:99999", steering=False)
