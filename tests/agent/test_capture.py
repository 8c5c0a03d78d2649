"""The capture path's promises, read back from a real PULL socket: a later in-place op cannot change
a captured row, a tap sees the value before a steer at the same tap edits it (whichever went on
first), a capture that fails is counted and never raised, detach leaves the module as it was (a
copy or a pickle of an attached module is a plain module), forwards of any batch size keep their
positions, episode ends travel with the metric rows, and the legacy path the benchmark keeps sends
the same frames."""

from __future__ import annotations

import copy
import inspect
import io
import math
from collections.abc import Iterator

import gymnasium
import numpy as np
import pytest
import torch
import zmq
from torch import nn

import agent_side
from agent_side import steer, wire
from agent_side.attachment import Attachment
from agent_side.taps import TapBuffer

CARTPOLE_OBS = ["cart_pos", "cart_vel", "pole_angle", "angle_vel"]


class Peer:
    """A bound PULL socket that decodes what an attachment sent."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"

    def frames(self, sent: int) -> list[wire.Frame]:
        """The ``sent`` frames an attachment handed over (its greeting among them), in order."""
        out = []
        for _ in range(sent):
            assert self.sock.poll(5000), f"only {len(out)} of {sent} frames arrived"
            out.append(wire.decode(self.sock.recv_multipart()))
        return out


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.sock.close()


def received(peer: Peer, tap: Attachment) -> list[wire.Frame]:
    tap.detach()
    return peer.frames(tap.counters()["sent"])


def rows_of(frames: list[wire.Frame], name: str) -> tuple[np.ndarray, np.ndarray]:
    acts = [f for f in frames if isinstance(f, wire.ActFrame) and f.tap == name]
    assert acts, f"no rows for {name}"
    return np.concatenate([f.data for f in acts]), np.concatenate([f.pos for f in acts])


def attached(model: nn.Module, taps: list[str], peer: Peer, **kwargs) -> Attachment:
    tap = agent_side.attach(model, taps, run="capture", endpoint=peer.endpoint, **kwargs)
    assert tap.wait_for_monitor(10)
    return tap


@pytest.mark.parametrize("legacy", [False, True])
def test_a_later_inplace_op_cannot_change_a_captured_row(peer: Peer, legacy: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    xs = [torch.randn(1, 4) for _ in range(6)]
    with torch.no_grad():
        outs = [model(x).clone() for x in xs]
    tap = Attachment(model, ["0:in", "0:out"], run="inplace", endpoint=peer.endpoint, _legacy=legacy)
    assert tap.wait_for_monitor(10)
    with torch.no_grad():
        for x in xs:
            x_in = x.clone()
            out = model(x_in)
            x_in.mul_(0)  # after the forward: the input and the output the tap copied are zeroed
            out.mul_(0)
    frames = received(peer, tap)
    rows_in, pos = rows_of(frames, "0:in")
    rows_out, _ = rows_of(frames, "0:out")
    np.testing.assert_array_equal(pos[:, 0], np.arange(6))
    np.testing.assert_array_equal(rows_in, torch.cat(xs).numpy())
    np.testing.assert_allclose(rows_out, torch.cat(outs).numpy(), rtol=1e-6)


@pytest.mark.parametrize("steer_first", [True, False])
def test_a_tap_sees_the_value_before_a_steer_at_the_same_tap(peer: Peer, steer_first: bool) -> None:
    """Steers at 0:in and 1:out: the taps there see the values before those steers, whether the
    steers went on before the taps' hooks (a monitor that connects later) or after; the model's
    output is steered either way, and the 1:out tap sees the effect of the steer upstream."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    d_in, d_out = torch.tensor([1.0, 0.0, -1.0, 0.5]), torch.tensor([0.0, 2.0, 1.0])
    with torch.no_grad():
        steered_in = x + 0.5 * d_in
        h = torch.tanh(model[0](steered_in))
        expect_out = model[2](h + 1.5 * d_out)

    def put_on() -> list[steer.Steer]:
        return [steer.add(model, "0:in", d_in, 0.5), steer.add(model, "1:out", d_out, 1.5)]

    steers = put_on() if steer_first else []
    tap = attached(model, ["0:in", "1:out"], peer)
    steers = steers or put_on()
    with torch.no_grad():
        out = model(x)
    for s in steers:
        s.remove()
    torch.testing.assert_close(out, expect_out)
    frames = received(peer, tap)
    np.testing.assert_array_equal(rows_of(frames, "0:in")[0], x.numpy())
    np.testing.assert_allclose(rows_of(frames, "1:out")[0], h.numpy(), rtol=1e-6)


def test_the_first_module_of_a_sequential_is_tapped_through_it_and_when_called_alone(peer: Peer) -> None:
    """An :in tap on a Sequential's first module takes the Sequential's input (no pre-hook on
    the module); a call of that module on its own is still captured, once; a module that is a
    Sequential's first twice over is hooked as usual."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    model = nn.Sequential(inner, nn.Linear(3, 2))
    shared = nn.Linear(2, 2)
    twice = nn.Sequential(shared, shared)
    xs = [torch.randn(2, 4) for _ in range(3)]
    tap = attached(model, ["0.0:in", "0:in", "1:in"], peer)
    assert not inner[0]._forward_pre_hooks and not inner._forward_pre_hooks  # wrapped forwards instead
    assert model[1]._forward_pre_hooks  # not a first module: a pre-hook
    with torch.no_grad():
        model(xs[0])
        inner[0](xs[1])  # on its own
        inner(xs[2])  # through its own Sequential only
    frames = received(peer, tap)
    rows, pos = rows_of(frames, "0.0:in")
    np.testing.assert_array_equal(rows, torch.cat(xs).numpy())
    np.testing.assert_array_equal(pos[:, 0], [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(rows_of(frames, "0:in")[0], torch.cat([xs[0], xs[2]]).numpy())
    other = agent_side.attach(twice, ["0:in"], run="twice", endpoint=peer.endpoint)
    try:
        assert other.wait_for_monitor(10)
        assert shared._forward_pre_hooks  # called twice a forward: the Sequential's input is only the first call's
    finally:
        other.detach()


def test_a_capture_that_fails_is_counted_and_never_raised(peer: Peer) -> None:
    model = nn.Sequential(nn.Identity())
    good = [torch.full((1, 4), float(i)) for i in range(4)]
    tap = attached(model, ["0:out"], peer)
    with torch.no_grad():
        model(good[0])
        model(torch.empty(1, 4, device="meta"))  # a value with no data to copy: the copy raises
        model(good[1])
        model(torch.empty(1, 4, device="meta"))
        model(good[2])
    assert tap.counters()["drops"] == 2
    frames = received(peer, tap)
    rows, pos = rows_of(frames, "0:out")
    np.testing.assert_array_equal(rows, torch.cat(good[:3]).numpy())
    np.testing.assert_array_equal(pos[:, 0], [0, 2, 4])  # the failed forwards were forwards


def test_forwards_of_any_batch_size_and_dtype_keep_their_positions(peer: Peer) -> None:
    model = nn.Sequential(nn.Identity())
    sizes = [1, 1, 3, 1, 2, 0, 2]
    xs = [torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) + 10 * k for k, n in enumerate(sizes)]
    tap = attached(model, ["0:out"], peer)
    for x in xs:
        model(x)
    model(torch.ones(1, 2, dtype=torch.float64))  # a new dtype: a frame of its own, sent as it is
    frames = received(peer, tap)
    acts = [f for f in frames if isinstance(f, wire.ActFrame)]
    assert [f.data.dtype for f in acts] == [np.float32, np.float64]
    rows, pos = rows_of(frames, "0:out")
    expect_pos = [(k, i) for k, n in enumerate(sizes) for i in range(n)] + [(len(sizes), 0)]
    assert [tuple(p) for p in pos.tolist()] == expect_pos
    np.testing.assert_array_equal(rows[:-1], torch.cat(xs).numpy())


def test_detach_leaves_the_module_as_it_was() -> None:
    """Hooks and wrapped forwards come off; a forward someone else had put on the instance (as
    accelerate does) is kept under the tap's and is back afterwards; the forward's signature is
    the module's own while attached."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    theirs = model[2].forward
    model[2].forward = theirs  # an instance forward of someone else's
    before = {name: (dict(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}
    sig = {name: inspect.signature(m.forward) for name, m in model.named_modules()}
    peer = Peer()
    try:
        tap = attached(model, ["0:in", "1:out", "2:out"], peer)
        assert model[1].__dict__.get("forward") is not None  # the tap's own forward is on
        assert {name: inspect.signature(m.forward) for name, m in model.named_modules()} == sig
        with torch.no_grad():
            model(torch.randn(2, 4))
        tap.detach()
    finally:
        peer.sock.close()
    after = {name: (dict(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}
    assert after == before
    assert model[2].__dict__["forward"] is theirs


def test_a_copy_or_pickle_of_an_attached_module_is_a_plain_module(peer: Peer) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    x = torch.randn(3, 4)
    tap = attached(model, ["1:out"], peer)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        twin[0].weight.mul_(2)
        for m in (twin, loaded):
            assert "forward" not in vars(m[1]) or not hasattr(vars(m[1])["forward"], "fn")
        torch.testing.assert_close(twin(x), torch.tanh(x @ twin[0].weight.T + twin[0].bias))
        torch.testing.assert_close(loaded(x), torch.tanh(model[0](x)))
        model(x)
    frames = received(peer, tap)
    assert rows_of(frames, "1:out")[0].shape == (3, 4)  # only the original's forward was captured


def test_episode_ends_travel_with_the_metric_rows(peer: Peer) -> None:
    """Always pushing right ends an episode every few steps; each end still arrives, with its step,
    but they go out together with the rows rather than a frame each."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    tap = attached(model, ["0:out"], peer, flush_ms=10_000)
    env = tap.wrap(gymnasium.make("CartPole-v1"), obs_names=CARTPOLE_OBS)
    obs, _ = env.reset(seed=0)
    ends = []
    for step in range(300):
        with torch.no_grad():
            model(torch.as_tensor(obs)[None])
        obs, _, term, trunc, _ = env.step(1)
        if term or trunc:
            ends.append(step)
            obs, _ = env.reset()
    assert len(ends) > 10
    frames = received(peer, tap)
    eps = [f for f in frames if isinstance(f, wire.EpFrame)]
    assert [int(e[0]) for f in eps for e in f.episodes] == ends
    assert len(eps) < len(ends)
    met = [f for f in frames if isinstance(f, wire.MetFrame)]
    assert sum(f.rows for f in met) == 300 and rows_of(frames, "0:out")[0].shape == (300, 2)


def _cartpole_frames(legacy: bool) -> list[wire.Frame]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    peer = Peer()
    try:
        tap = Attachment(model, ["0:in", "1:out", "2:out"], run="same", endpoint=peer.endpoint, _legacy=legacy)
        assert tap.wait_for_monitor(10)
        env = tap.wrap(gymnasium.make("CartPole-v1"), obs_names=CARTPOLE_OBS)
        obs, _ = env.reset(seed=0)
        for _ in range(700):
            with torch.no_grad():
                action = int(model(torch.as_tensor(obs)[None]).argmax())
            obs, _, term, trunc, _ = env.step(action)
            if term or trunc:
                obs, _ = env.reset()
        return received(peer, tap)
    finally:
        peer.sock.close()


def test_the_legacy_path_the_benchmark_keeps_sends_the_same_rows() -> None:
    new, old = _cartpole_frames(False), _cartpole_frames(True)
    for name in ("0:in", "1:out", "2:out"):
        for a, b in zip(rows_of(new, name), rows_of(old, name), strict=True):
            np.testing.assert_array_equal(a, b)

    def metrics(frames: list[wire.Frame]) -> tuple[np.ndarray, np.ndarray]:
        met = [f for f in frames if isinstance(f, wire.MetFrame)]
        return np.concatenate([f.data for f in met]), np.concatenate([f.pos for f in met])

    for a, b in zip(metrics(new), metrics(old), strict=True):
        np.testing.assert_array_equal(a, b)
    episodes = [[e for f in fr if isinstance(f, wire.EpFrame) for e in f.episodes] for fr in (new, old)]
    assert episodes[0] == episodes[1] and len(episodes[0]) > 5


# -- the buffer alone ---------------------------------------------------------------------------
def _buffer(**kwargs) -> tuple[TapBuffer, list[tuple[np.ndarray, np.ndarray, list[int]]]]:
    sent: list[tuple[np.ndarray, np.ndarray, list[int]]] = []
    opts = {"per_position": False, "flush_rows": 8, "flush_s": math.inf, **kwargs}
    return TapBuffer("t", emit=lambda d, p, lead: sent.append((d, p, lead)), **opts), sent


def test_a_sent_frame_is_never_overwritten_by_the_rows_after_it() -> None:
    buf, sent = _buffer()
    x = torch.zeros(1, 3)
    due = []
    for k in range(20):
        x.fill_(float(k))  # one tensor, edited in place between forwards
        due.append(buf.put(x, k))
    assert due.index(True) == 7  # full at flush_rows; the caller sends, else the next forward does
    buf.flush()
    buf.flush()  # nothing pending: nothing sent
    assert [len(d) for d, _, _ in sent] == [8, 8, 4]
    data = np.concatenate([d for d, _, _ in sent])  # the first frames, after the ring was refilled twice
    np.testing.assert_array_equal(data, np.repeat(np.arange(20.0, dtype=np.float32), 3).reshape(20, 3))
    np.testing.assert_array_equal(np.concatenate([p for _, p, _ in sent]), np.stack([np.arange(20), np.zeros(20)], axis=1))
    assert all(lead == [] for _, _, lead in sent)


def test_language_model_shapes_a_forward_too_big_for_a_frame_and_per_position_rows() -> None:
    buf, sent = _buffer(per_position=True, flush_rows=16)
    x = torch.randn(2, 3, 4, 5)  # [batch, position, head, d_head]: a row per position
    buf.put(x, 0)
    buf.put(x + 1, 1)
    big = torch.randn(1, 20, 4, 5)  # 20 rows: more than the buffer's 16
    buf.put(big, 2)
    assert len(sent) == 2  # the pending rows first, then the big forward on its own
    (d0, p0, lead0), (d1, p1, lead1) = sent
    assert lead0 == [2, 3] and lead1 == [1, 20]
    np.testing.assert_array_equal(d0, torch.cat([x, x + 1]).reshape(12, 20).numpy())
    np.testing.assert_array_equal(p0.tolist(), [[s, i] for s in (0, 1) for i in range(6)])
    np.testing.assert_array_equal(d1, big.reshape(20, 20).numpy())
    np.testing.assert_array_equal(p1[:, 1], np.arange(20))


def test_values_that_need_grad_or_another_dtype_are_copied_detached() -> None:
    buf, sent = _buffer()
    w = torch.randn(2, 3, requires_grad=True)
    buf.put(w * 2, 0)  # requires grad: copied detached, the graph is not kept
    buf.put(torch.ones(2, 3, dtype=torch.bfloat16), 1)  # not sendable as it is: float32, a frame of its own
    buf.put(torch.ones(2, 3, dtype=torch.float64), 2)  # sendable: a frame of its own, as it is
    buf.flush()
    assert [(d.dtype, len(d)) for d, _, _ in sent] == [(np.float32, 4), (np.float64, 2)]  # bfloat16 went as float32
    np.testing.assert_allclose(sent[0][0][:2], (w * 2).detach().numpy())
