"""The wire refuses the impossible, each bound under its own reason: property-based, over the
whole range msgpack can carry, against the rule written out here independently of the decoder."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_side import wire
from agent_side.wire import DEFAULT_LIMITS, WireError, decode, encode_act, encode_ctl, encode_ep, encode_met, encode_tok
from monitor.service.ingest import Monitor
from monitor.store import keys

LIM = DEFAULT_LIMITS
MSGPACK_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _pos(rows: int) -> np.ndarray:
    return np.stack([np.arange(rows), np.zeros(rows, dtype=np.int64)], axis=1).astype(np.int64)


def _act(**over: object) -> list[bytes]:
    parts = [bytes(p) for p in encode_act("r", "p", 0, 0, "t:out", np.ones((2, 3), np.float32), _pos(2))]
    h = msgpack.unpackb(parts[0])
    h.update(over)
    parts[0] = msgpack.packb(h)
    return parts


def _reason(parts: list) -> str | None:
    try:
        decode(parts)
    except WireError as e:
        return e.reason
    return None


def _expected_name(name: str) -> str | None:
    """The name rule, written out: 1-256 chars, none a control, format, separator or space char."""
    if not name:
        return "bad_name"
    if len(name) > LIM.name_chars:
        return "name_too_long"
    import unicodedata

    bad = any(unicodedata.category(c)[0] in "CZ" for c in name)  # Other (Cc, Cf, Cs, Co, Cn) and Separator (Zs, Zl, Zp)
    return "bad_name" if bad else None


@FAST
@given(st.sampled_from(["seq", "drops", "unwatched"]), MSGPACK_INTS)
def test_counts_are_non_negative_and_bounded(field: str, value: int) -> None:
    ok = 0 <= value <= LIM.count_max
    assert _reason(_act(**{field: value})) == (None if ok else f"bad_{field}")


@FAST
@given(st.text(max_size=300))
def test_names_are_printable_without_separators_within_the_limit(name: str) -> None:
    want = _expected_name(name)
    for field in ("run", "pub", "tap"):
        assert _reason(_act(**{field: name})) == want, field
    parts = [bytes(p) for p in encode_met("r", "p", 0, 0, ["ok", name], np.zeros((1, 2)), _pos(1))] if name != "ok" else None
    if parts is not None:
        assert _reason(parts) == want
    assert wire.name_problem(name) == want


@pytest.mark.parametrize(
    "name",
    ["op\0v", "a\nrun x: steps 1", "\x1b[31mred", "tab\there", "line\u2028sep", "bidi\u202eevil", "sp ace", "zero\u200bwidth"],
)
def test_the_names_of_the_attacks_are_refused(name: str) -> None:
    assert _reason(_act(run=name)) == "bad_name"


def test_names_that_runs_and_taps_use_are_accepted() -> None:
    for name in ("x:metrics", "mlp_extractor.policy_net.0:in", "latents:tc-4/2", "blocks.3.hook_resid_post", "ünïcode-run"):
        assert _reason(_act(run=name, tap=name)) is None


@FAST
@given(st.lists(MSGPACK_INTS.filter(lambda x: -(2**63) <= x < 2**63), min_size=4, max_size=4))
def test_steps_and_indices_are_non_negative_and_bounded(values: list[int]) -> None:
    pos = np.array(values, dtype=np.int64).reshape(2, 2)
    parts = [bytes(p) for p in encode_act("r", "p", 0, 0, "t:out", np.ones((2, 1), np.float32), pos)]
    ok = all(0 <= v <= LIM.count_max for v in values)
    assert _reason(parts) == (None if ok else "bad_step")
    step = values[0]
    tok = [bytes(p) for p in encode_tok("r", "p", 0, 0, 0, [["a"]])]
    h = msgpack.unpackb(tok[0])
    h["step"] = step
    tok[0] = msgpack.packb(h)
    assert _reason(tok) == (None if 0 <= step <= LIM.count_max else "bad_step")


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True, width=64), st.sampled_from(["float16", "float32", "float64"]))
def test_values_are_finite_and_bounded(x: float, dtype: str) -> None:
    with np.errstate(over="ignore"):
        data = np.array([[x]], dtype=np.float64).astype(dtype)  # too large for float16/32: Inf
    v = float(data[0, 0])
    want = "non_finite" if not math.isfinite(v) else ("out_of_range" if abs(v) > LIM.value_max else None)
    assert _reason([bytes(p) for p in encode_act("r", "p", 0, 0, "t", data, _pos(1))]) == want
    want = "non_finite" if not math.isfinite(x) else ("out_of_range" if abs(x) > LIM.value_max else None)
    assert _reason([bytes(p) for p in encode_met("r", "p", 0, 0, ["m"], np.array([[x]]), _pos(1))]) == want


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_time_is_a_finite_time_since_1970(t: float) -> None:
    ok = math.isfinite(t) and 0 <= t <= LIM.time_max
    assert _reason(_act(t=t)) == (None if ok else "bad_time")


@FAST
@given(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e40, max_value=1e40),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e40, max_value=1e40),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e40, max_value=1e40),
    st.sampled_from([0.0, 1.0, 0.5, -1.0, 2.0]),
)
def test_episodes_hold_a_step_an_index_a_bounded_return_a_count_and_flags(
    step: float, ret: float, length: float, flag: float
) -> None:
    parts = [bytes(p) for p in encode_ep("r", "p", 0, 0, [[step, 0, ret, length, flag, 0]])]
    if not 0 <= step <= LIM.count_max:
        want: str | None = "bad_step"
    elif abs(ret) > LIM.value_max or not 0 <= length <= LIM.count_max or flag not in (0.0, 1.0):
        want = "out_of_range"
    else:
        want = None
    assert _reason(parts) == want


@FAST
@given(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=False, min_value=-1e40, max_value=1e40))
def test_ctl_events_steps_versions_and_amounts_are_bounded(n: int, alpha: float) -> None:
    ev = {"event": "applied", "id": "latents:tc/0", "op": "add", "tap": "1:out", "version": n, "step": n, "alpha": alpha}
    if not -1 <= n <= LIM.count_max:  # fields are checked in order: version, step, alpha
        want: str | None = "out_of_range"
    elif n < 0:
        want = "bad_step"
    elif abs(alpha) > LIM.value_max:
        want = "out_of_range"
    else:
        want = None
    assert _reason([bytes(p) for p in encode_ctl("r", "p", 0, 0, ev)]) == want


@FAST
@given(
    st.sampled_from(
        [
            {"seq": -1},
            {"drops": -(10**18)},
            {"run": "op\0v"},
            {"tap": "x\ny"},
            {"t": -5.0},
            {"seq": 2**60},
            {"unwatched": -3},
        ]
    ),
    st.booleans(),
)
def test_no_state_is_made_for_a_rejected_frame(store, over: dict, known: bool) -> None:  # noqa: ANN001
    """Whatever a frame is refused for, the monitor holds and writes nothing for it: no run, no
    registry entry, no publisher (before: a stale_seq frame registered its run)."""
    store.r.flushdb()
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False)
    try:
        if known:
            assert mon.handle(_act(run="r", seq=0))
        before = {r: (s.frames, dict(s.pubs)) for r, s in mon.runs.items()}
        assert not mon.handle(_act(**{"run": "r", "seq": 1, **over}))
        assert {r: (s.frames, dict(s.pubs)) for r, s in mon.runs.items()} == before
        mon.flush()
        registered = {r.decode() for r in store.r.zrange(keys.RUNS, 0, -1)}
        assert registered == ({"r"} if known else set())
        assert sum(mon.rejected.values()) == 1
    finally:
        mon.close()


def test_a_negative_sequence_number_no_longer_registers_a_run_as_stale(store) -> None:  # noqa: ANN001
    """The 57-years-ago run: seq -1 from an unknown publisher used to be refused as stale_seq
    after its run (last seen 0) was registered and then written."""
    mon = Monitor(store, endpoint="tcp://127.0.0.1:0", steering=False)
    try:
        assert not mon.handle(_act(run="ghost", seq=-1))
        mon.flush()
        assert mon.rejected == {"bad_seq": 1} and "ghost" not in mon.runs and store.runs() == []
    finally:
        mon.close()
