"""The one wire format: round trips for every dtype and shape, and a decoder that only ever
returns a frame or raises its own error."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_side import wire
from agent_side.wire import Frame, WireError, decode, encode_act, encode_ep, encode_met


def _pos(rows: int) -> np.ndarray:
    pos = np.zeros((rows, 2), dtype=np.int64)
    pos[:, 0] = np.arange(rows) // 2 + 7
    pos[:, 1] = np.arange(rows) % 2
    return pos


def _bytes(parts: list) -> list[bytes]:
    return [bytes(p) for p in parts]


@pytest.mark.parametrize("dtype", wire.ACT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (64, 64), (3, 4096), (257, 5)])
def test_act_round_trip(dtype: str, shape: tuple[int, int]) -> None:
    data = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    f = decode(_bytes(encode_act("run-1", "p1", 41, 3, "mlp.0:in", data, _pos(shape[0]), lead=[shape[0]])))
    assert (f.kind, f.run, f.pub, f.seq, f.drops, f.tap, f.lead) == ("act", "run-1", "p1", 41, 3, "mlp.0:in", [shape[0]])
    assert f.data.dtype == np.dtype(dtype) and f.data.shape == shape
    np.testing.assert_array_equal(f.data, data)
    np.testing.assert_array_equal(f.pos, _pos(shape[0]))
    assert f.rows == shape[0]


def test_met_and_ep_round_trip() -> None:
    data = np.arange(12, dtype=np.float64).reshape(3, 4)
    f = decode(_bytes(encode_met("r", "p", 0, 0, ["a", "b", "c", "d"], data, _pos(3))))
    assert f.kind == "met" and f.names == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(f.data, data)
    eps = [[10, 0, 21.0, 21, 1, 0], [12, 3, 500.0, 500, 0, 1]]
    f = decode(_bytes(encode_ep("r", "p", 1, 0, eps)))
    assert f.kind == "ep" and f.episodes == eps and f.rows == 2


def _act_parts(**over) -> list[bytes]:
    data = np.ones((2, 3), dtype=np.float32)
    parts = _bytes(encode_act("r", "p", 0, 0, "t:out", data, _pos(2)))
    if over:
        h = msgpack.unpackb(parts[0])
        h.update(over)
        parts[0] = msgpack.packb(h)
    return parts


@pytest.mark.parametrize(
    "parts, reason",
    [
        ([b"\xc1garbage", b"", b""], "bad_msgpack"),
        (_act_parts(v=99), "version"),
        (_act_parts(kind="nope"), "bad_header"),
        (_act_parts(shape=[2, 4]), "shape_mismatch"),
        (_act_parts(shape=[1 << 30, 1 << 30]), "oversized"),
        (_act_parts(dtype="object"), "bad_dtype"),
        (_act_parts(seq="1"), "bad_header"),
        (_act_parts()[:2], "bad_frame"),
        ([msgpack.packb([1, 2, 3])], "bad_header"),
        ([], "bad_frame"),
    ],
)
def test_rejections_name_their_reason(parts: list[bytes], reason: str) -> None:
    with pytest.raises(WireError) as e:
        decode(parts)
    assert e.value.reason == reason


def test_nan_and_inf_are_rejected() -> None:
    for bad in (np.nan, np.inf, -np.inf):
        data = np.ones((4, 2), dtype=np.float32)
        data[2, 1] = bad
        with pytest.raises(WireError) as e:
            decode(_bytes(encode_act("r", "p", 0, 0, "t", data, _pos(4))))
        assert e.value.reason == "non_finite"


def test_limits_are_checked_before_allocation() -> None:
    small = wire.Limits(header_bytes=64, frame_bytes=1024)
    with pytest.raises(WireError) as e:
        decode(_bytes(encode_act("r" * 100, "p", 0, 0, "t", np.ones((1, 1), np.float32), _pos(1))), small)
    assert e.value.reason == "oversized"
    with pytest.raises(WireError) as e:
        decode(_bytes(encode_act("r", "p", 0, 0, "t", np.ones((64, 64), np.float32), _pos(64))), small)
    assert e.value.reason == "oversized"


def _check(parts: list[bytes]) -> None:
    try:
        f = decode(parts)
    except WireError as e:
        assert e.reason
        return
    assert isinstance(f, Frame)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=256), min_size=0, max_size=5))
def test_fuzz_random_parts(parts: list[bytes]) -> None:
    _check(parts)


_valid = [
    _bytes(encode_act("run", "p", 5, 1, "tap:in", np.ones((3, 4), np.float16), _pos(3), lead=[3])),
    _bytes(encode_met("run", "p", 6, 1, ["x", "y"], np.zeros((2, 2)), _pos(2))),
    _bytes(encode_ep("run", "p", 7, 1, [[1, 0, 2.0, 3, 1, 0]])),
]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(range(len(_valid))), st.data())
def test_fuzz_mutated_frames(which: int, data: st.DataObject) -> None:
    parts = [bytearray(p) for p in _valid[which]]
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(parts) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "grow", "drop", "dup"]))
        if op == "flip" and parts[i]:
            j = data.draw(st.integers(0, len(parts[i]) - 1))
            parts[i][j] = data.draw(st.integers(0, 255))
        elif op == "cut":
            parts[i] = parts[i][: data.draw(st.integers(0, len(parts[i])))]
        elif op == "grow":
            parts[i] += data.draw(st.binary(min_size=1, max_size=16))
        elif op == "drop" and len(parts) > 1:
            parts.pop(i)
        elif op == "dup":
            parts.append(bytearray(parts[i]))
    _check([bytes(p) for p in parts])


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["v", "kind", "run", "pub", "seq", "t", "drops", "tap", "dtype", "shape", "lead", "names", "episodes"]),
        st.one_of(
            st.none(),
            st.integers(-2, 2**40),
            st.text(max_size=8),
            st.floats(),
            st.lists(st.integers(-3, 70), max_size=4),
            st.lists(st.lists(st.floats(), max_size=7), max_size=3),
        ),
    ),
    st.lists(st.binary(max_size=64), max_size=3),
)
def test_fuzz_structured_headers(header: dict, bufs: list[bytes]) -> None:
    _check([msgpack.packb(header), *bufs])


def test_each_kind_decodes_to_its_own_type() -> None:
    """One record type per frame kind: an activation frame has no episodes, an episode frame no
    data, and each says its kind."""
    from agent_side.wire import ActFrame, CtlFrame, EpFrame, MetFrame, TokFrame, encode_ctl, encode_ep, encode_met, encode_tok

    pos = np.array([[0, 0], [1, 0]], dtype=np.int64)
    frames = {
        "act": decode([bytes(p) for p in encode_act("r", "p", 0, 0, "t:out", np.ones((2, 3), np.float32), pos)]),
        "met": decode([bytes(p) for p in encode_met("r", "p", 1, 0, ["a"], np.ones((2, 1)), pos)]),
        "ep": decode([bytes(p) for p in encode_ep("r", "p", 2, 0, [[1, 0, 10.0, 2, 1, 0]])]),
        "tok": decode([bytes(p) for p in encode_tok("r", "p", 3, 0, 0, [["a", "b"]])]),
        "ctl": decode([bytes(p) for p in encode_ctl("r", "p", 4, 0, {"event": "hello", "control": False})]),
    }
    for kind, typ in [("act", ActFrame), ("met", MetFrame), ("ep", EpFrame), ("tok", TokFrame), ("ctl", CtlFrame)]:
        f = frames[kind]
        assert (
            type(f) is typ
            and f.kind == kind
            and (f.run, f.pub, f.seq) == ("r", "p", ["act", "met", "ep", "tok", "ctl"].index(kind))
        )
    assert not hasattr(frames["act"], "episodes") and not hasattr(frames["ep"], "data") and not hasattr(frames["met"], "tap")
    assert [frames[k].rows for k in ("act", "met", "ep", "tok", "ctl")] == [2, 2, 1, 2, 0]
