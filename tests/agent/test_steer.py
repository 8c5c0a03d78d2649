"""Steering edits a tap exactly as its formula says, composes, and comes off bit for bit."""

from __future__ import annotations

import json
import math

import msgpack
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import agent_side.steer as steer_mod
from agent_side.steer import Intervention, SteerError, ablate, add, clamp, from_transcoder, scale, steer_latent
from monitor.transcoders.model import Transcoder


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


class _Functional(nn.Module):
    """Activations via F.relu: the post-relu hidden state exists only as ``fc2:in``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.lstm, self.head = nn.LSTM(3, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _vec(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(42))


def _scaled(h: torch.Tensor, d: torch.Tensor, factor: float) -> torch.Tensor:
    u = d / d.norm()
    return h + (factor - 1) * (h @ u).unsqueeze(-1) * u


@torch.no_grad()
def test_add_adds_alpha_times_the_direction_and_comes_off_bit_for_bit() -> None:
    pol, x, d = _mlp(), _x(6, 4), _vec(8, 0)
    clean, expected = pol(x), pol[2:](pol[:2](x) + 2.5 * d)  # computed by hand before any hook is on
    s = add(pol, "1:out", d, 2.5)
    torch.testing.assert_close(pol(x), expected)
    assert not torch.allclose(pol(x), clean)
    s.remove()
    assert torch.equal(pol(x), clean)
    s.remove()  # idempotent
    assert not s.active and s.tap == "1:out" and s.op == "add"


@torch.no_grad()
def test_scale_multiplies_only_the_component_along_the_direction() -> None:
    pol, x, d = _mlp(), _x(6, 4), _vec(8, 1)
    clean, h = pol(x), pol[:3](x)
    seen = {}
    probe = pol[3].register_forward_pre_hook(lambda m, a: seen.update(h=a[0]))
    with scale(pol, "2:out", d, 3.0):
        got = pol(x)
    probe.remove()
    u = d / d.norm()
    torch.testing.assert_close(seen["h"] @ u, 3.0 * (h @ u))
    torch.testing.assert_close(seen["h"] - (seen["h"] @ u).unsqueeze(-1) * u, h - (h @ u).unsqueeze(-1) * u)
    torch.testing.assert_close(got, pol[3:](_scaled(h, d, 3.0)))
    assert torch.equal(pol(x), clean)


@torch.no_grad()
def test_ablate_projects_the_direction_out_like_scale_zero() -> None:
    pol, x, d = _mlp(), _x(6, 4), _vec(8, 2)
    h = pol[:2](x)
    seen = {}
    probe = pol[2].register_forward_pre_hook(lambda m, a: seen.update(h=a[0]))
    with ablate(pol, "1:out", d):
        got = pol(x)
    probe.remove()
    torch.testing.assert_close(seen["h"] @ (d / d.norm()), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(got, pol[2:](h - (h @ (d / d.norm())).unsqueeze(-1) * d / d.norm()))
    with scale(pol, "1:out", d, 0.0):
        torch.testing.assert_close(pol(x), got)


@torch.no_grad()
def test_in_tap_reaches_a_hidden_state_that_exists_only_as_the_next_input() -> None:
    net, x, d = _Functional(), _x(5, 4), _vec(8, 3)
    clean = net(x)
    with add(net, "fc2:in", d, -1.5):
        got = net(x)
    torch.testing.assert_close(got, net.fc3(F.relu(net.fc2(F.relu(net.fc1(x)) - 1.5 * d))))
    with add(net, "fc1:out", d, -1.5):  # before the relu: a different intervention
        assert not torch.allclose(net(x), got)
    assert torch.equal(net(x), clean)


@torch.no_grad()
def test_tokens_and_vectorized_batches_are_steered_along_the_last_dim() -> None:
    pol, d = _mlp(), _vec(8, 4)
    for x in (_x(3, 7, 4), _x(2, 3, 5, 4)):
        clean, h = pol(x), pol[:2](x)
        with scale(pol, "2:in", d, -2.0):
            got = pol(x)
        assert got.shape == clean.shape
        torch.testing.assert_close(got, pol[2:](_scaled(h, d, -2.0)))
        assert torch.equal(pol(x), clean)


@torch.no_grad()
def test_tuple_output_steers_the_first_tensor_only() -> None:
    net, x, d = _Recurrent(), _x(4, 6, 3), _vec(5, 5)
    clean_out, (clean_h, clean_c) = net.lstm(x)
    clean = net(x)
    with add(net, "lstm:out", d, 0.7):
        out, (h, c) = net.lstm(x)
        got = net(x)
    torch.testing.assert_close(out, clean_out + 0.7 * d)
    assert torch.equal(h, clean_h) and torch.equal(c, clean_c)
    torch.testing.assert_close(got, net.head((clean_out + 0.7 * d)[:, -1]))
    assert torch.equal(net(x), clean)


@torch.no_grad()
def test_dict_output_steers_its_first_tensor() -> None:
    class Heads(nn.Module):
        def forward(self, x: torch.Tensor) -> dict:
            return {"meta": "step", "logits": x * 2, "value": x.sum(-1)}

    root, x, d = nn.Sequential(Heads()), _x(3, 4), _vec(4, 6)
    with add(root, "0:out", d, 1.0):
        out = root(x)
    torch.testing.assert_close(out["logits"], x * 2 + d)
    assert torch.equal(out["value"], x.sum(-1)) and out["meta"] == "step"


@torch.no_grad()
def test_steers_compose_in_registration_order_and_come_off_one_by_one() -> None:
    pol, x, d, e = _mlp(), _x(6, 4), _vec(8, 7), _vec(8, 8)
    clean, h = pol(x), pol[:2](x)
    all_three = pol[4](pol[2:4](_scaled(h + 2.0 * d, e, 0.5)) + e)
    other_order = pol[4](pol[2:4](_scaled(h, e, 0.5) + 2.0 * d) + e)
    without_first = pol[4](pol[2:4](_scaled(h, e, 0.5)) + e)
    scale_only = pol[2:](_scaled(h, e, 0.5))
    assert not torch.allclose(all_three, other_order)  # the order is observable
    first = add(pol, "1:out", d, 2.0)
    second = scale(pol, "1:out", e, 0.5)
    other = add(pol, "3:out", e, 1.0)
    torch.testing.assert_close(pol(x), all_three)
    first.remove()
    torch.testing.assert_close(pol(x), without_first)
    other.remove()
    torch.testing.assert_close(pol(x), scale_only)
    second.remove()
    assert torch.equal(pol(x), clean)


@torch.no_grad()
def test_steers_at_an_in_tap_compose_in_registration_order() -> None:
    net, x, d, e = _Functional(), _x(5, 4), _vec(8, 15), _vec(8, 16)
    h = F.relu(net.fc1(x))
    expected, other_order = net.fc3(F.relu(net.fc2(_scaled(h + d, e, 2.0)))), net.fc3(F.relu(net.fc2(_scaled(h, e, 2.0) + d)))
    assert not torch.allclose(expected, other_order)
    with add(net, "fc2:in", d, 1.0), scale(net, "fc2:in", e, 2.0):
        torch.testing.assert_close(net(x), expected)


@torch.no_grad()
def test_clamp_sets_the_latent_by_adding_the_decoded_difference() -> None:
    pol, x = _mlp(), _x(6, 4)
    we, wd = _vec(8, 9), _vec(8, 10)
    clean, h = pol(x), pol[:3](x)
    with clamp(pol, "2:out", w_enc=we, b_enc=0.1, w_dec=wd.numpy(), value=2.0):
        got = pol(x)
    z = torch.relu(h @ we + 0.1)
    assert (z > 0).any() and (z < 2.0).any()  # the test exercises a real change
    torch.testing.assert_close(got, pol[3:](h + (2.0 - z).unsqueeze(-1) * wd))
    assert torch.equal(pol(x), clean)


@torch.no_grad()
def test_clamp_reads_its_latent_at_another_tap_of_the_same_forward() -> None:
    pol, x = _mlp(), _x(6, 4)
    we, wd = _vec(4, 11), _vec(8, 12)
    h = pol[:2](x)
    with clamp(pol, "1:out", w_enc=we.tolist(), b_enc=0.0, w_dec=wd, value=0.0, source="0:in"):
        got = pol(x)
    torch.testing.assert_close(got, pol[2:](h - torch.relu(x @ we).unsqueeze(-1) * wd))
    with (
        clamp(pol, "1:out", w_enc=we, b_enc=0.0, w_dec=wd, value=0.0, source="4:out"),
        pytest.raises(SteerError, match="'4:out' did not run before the tap"),
    ):
        pol(x)
    with clamp(pol, "2:in", w_enc=we, b_enc=0.0, w_dec=wd, value=0.0, source="0:in"):
        pol(x)
        with pytest.raises(SteerError, match="'0:in' did not run"):  # no stale value from the last forward
            pol[2:](h)


@torch.no_grad()
def test_clamp_refuses_a_source_whose_rows_do_not_line_up_with_the_tap() -> None:
    net, x = _Recurrent(), _x(4, 4, 3)  # source rows [4, 4] (batch, time), tap rows [4]: would broadcast silently
    with (
        clamp(net, "head:in", w_enc=[1.0] * 3, b_enc=0.0, w_dec=[1.0] * 5, value=0.0, source="lstm:in"),
        pytest.raises(SteerError, match=r"source 'lstm:in'.*\(4, 4\) do not line up with tap rows \(4,\)"),
    ):
        net(x)


@torch.no_grad()
def test_steer_latent_from_a_real_transcoder() -> None:
    pol, x = _mlp(), _x(6, 4)
    torch.manual_seed(3)
    tc = Transcoder(4, 3, 8)
    tc.b_enc.copy_(torch.tensor([0.2, -0.1, 0.3]))
    h, j, row = pol[:2](x), 1, tc.W_dec[1]
    clean = pol(x)
    with steer_latent(pol, "1:out", tc, j, op="add", alpha=torch.tensor(2.5)):
        torch.testing.assert_close(pol(x), pol[2:](h + 2.5 * row))
    with steer_latent(pol, "1:out", tc, j, op="scale", alpha=3.0):
        torch.testing.assert_close(pol(x), pol[2:](_scaled(h, row, 3.0)))
    with steer_latent(pol, "1:out", tc, j, op="ablate"):
        torch.testing.assert_close(pol(x), pol[2:](_scaled(h, row, 0.0)))
    z = tc.encode(x)
    z_set = z.clone()
    z_set[:, j] = 4.0
    with steer_latent(pol, "1:out", tc, j, op="clamp", value=4.0, source="0:in") as s:
        assert s.op == "clamp"
        torch.testing.assert_close(pol(x), pol[2:](h + tc.decode(z_set) - tc.decode(z)))
    assert torch.equal(pol(x), clean)
    with pytest.raises(SteerError, match="latent"):
        steer_latent(pol, "1:out", tc, 3, op="add", alpha=1.0)


def test_steering_keeps_autograd_intact() -> None:
    pol, d = _mlp(), _vec(8, 13)
    x = _x(6, 4).requires_grad_()
    with scale(pol, "1:out", d, 2.0):  # ReLU saves its output: an in-place edit would break backward
        pol(x).sum().backward()
    got = x.grad.clone()
    x.grad = None
    pol[2:](_scaled(pol[:2](x), d, 2.0)).sum().backward()
    torch.testing.assert_close(got, x.grad)
    x.grad = None
    with add(pol, "3:out", d, 2.0), add(pol, "2:in", d, -1.0):
        pol(x).sum().backward()
    got = x.grad.clone()
    x.grad = None
    (pol[4](pol[2:4](pol[:2](x) - d) + 2.0 * d)).sum().backward()
    torch.testing.assert_close(got, x.grad)


@torch.no_grad()
def test_direction_is_copied_and_cast_to_the_activation_dtype() -> None:
    pol, x = _mlp().double(), _x(6, 4).double()
    d = _vec(8, 14).double()  # same dtype: a lazy .to() would alias instead of copying
    h, clean = pol[:2](x), pol(x)
    s = add(pol, "1:out", d, 1.0)
    d.zero_()  # steering keeps its own copy
    out = pol(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, pol[2:](h + _vec(8, 14).double()))
    s.remove()
    assert torch.equal(pol(x), clean)


@torch.no_grad()
def test_width_mismatch_is_an_error_naming_the_tap_and_both_sizes() -> None:
    pol, x = _mlp(), _x(6, 4)
    with add(pol, "1:out", [1.0] * 5, 1.0), pytest.raises(SteerError, match=r"'1:out'.*5 entries.*last dim is 8"):
        pol(x)
    with (
        clamp(pol, "1:out", w_enc=[1.0] * 8, b_enc=0.0, w_dec=[1.0] * 8, value=0.0, source="0:in"),
        pytest.raises(SteerError, match=r"source '0:in'.*w_enc has 8 entries.*last dim is 4"),
    ):
        pol(x)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: scale(p, "1:out", [0.0] * 8, 2.0), "zero norm"),
        (lambda p: ablate(p, "1:out", torch.zeros(8)), "zero norm"),
        (lambda p: add(p, "1:out", [1.0, float("nan")], 1.0), "NaN"),
        (lambda p: add(p, "1:out", [[1.0, 2.0]], 1.0), "1-D"),
        (lambda p: add(p, "1:out", ["a"], 1.0), "numbers"),
        (lambda p: add(p, "1:out", [1.0], float("inf")), "alpha"),
        (lambda p: add(p, "nope:out", [1.0], 1.0), "no module named 'nope'"),
        (lambda p: add(p, "1:sideways", [1.0], 1.0), "site"),
    ],
)
def test_bad_steers_are_refused_at_construction(make, match) -> None:
    pol, x = _mlp(), _x(6, 4)
    clean = pol(x)
    with pytest.raises(SteerError, match=match):
        make(pol)
    assert torch.equal(pol(x), clean)  # nothing was left registered


_CLAMP = Intervention(
    "clamp", "fc2:in", (0.5, -1.0), value=3.0, w_enc=(1.0, 2.0, 0.25), b_enc=-0.5, source="fc1:in", id="fc2:in/3"
)


@pytest.mark.parametrize(
    "iv",
    [
        Intervention("add", "fc2:in", (1.0, 2.0), alpha=-2.5, id="a"),
        Intervention("scale", "fc1:out", (0.5,), alpha=0.0),
        Intervention("ablate", "fc1:out", (1, 2)),
        _CLAMP,
    ],
)
def test_intervention_round_trips_through_msgpack_and_json(iv: Intervention) -> None:
    assert Intervention.from_msg(iv.to_msg()) == iv
    assert Intervention.from_msg(msgpack.unpackb(msgpack.packb(iv.to_msg()))) == iv
    assert Intervention.from_msg(json.loads(json.dumps(iv.to_msg()))) == iv


@torch.no_grad()
def test_intervention_apply_matches_the_functions_and_from_transcoder() -> None:
    net, x = _Functional(), _x(5, 4)
    torch.manual_seed(4)
    tc = Transcoder(4, 3, 8)
    iv = from_transcoder(tc, 2, tap="fc2:in", op="clamp", value=1.0, source="fc1:in")
    assert iv.id == "fc2:in/2" and iv.direction == tuple(tc.W_dec[2].tolist()) and iv.b_enc == float(tc.b_enc[2])
    iv = Intervention.from_msg(msgpack.unpackb(msgpack.packb(iv.to_msg())))
    with iv.apply(net):
        got = net(x)
    with clamp(net, "fc2:in", w_enc=tc.W_enc[:, 2], b_enc=float(tc.b_enc[2]), w_dec=tc.W_dec[2], value=1.0, source="fc1:in"):
        assert torch.equal(net(x), got)
    expected = net.fc3(F.relu(net.fc2(F.relu(net.fc1(x)) + 1.0)))
    with Intervention("add", "fc2:in", (0.5,) * 8, alpha=2.0).apply(net):
        torch.testing.assert_close(net(x), expected)
    for bad in (3, -1, True, 1.0):
        with pytest.raises(SteerError, match="latent must be an int"):
            from_transcoder(tc, bad, tap="fc2:in", op="add")


_OK = {"op": "add", "tap": "fc2:in", "direction": [1.0, 2.0], "alpha": 1.0}


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        ([1, 2], "must be a dict, got list"),
        ("add", "must be a dict, got str"),
        (None, "must be a dict, got NoneType"),
        ({**_OK, "evil": 1}, "unknown keys 'evil'"),
        ({**_OK, 7: 1}, "unknown keys 7"),
        ({"tap": "fc2:in", "direction": [1.0]}, "missing keys: op"),
        ({**_OK, "op": "multiply"}, "op must be one of"),
        ({**_OK, "op": ["add"]}, "op must be one of"),
        ({**_OK, "alpha": float("nan")}, "alpha must be finite"),
        ({**_OK, "alpha": float("inf")}, "alpha must be finite"),
        ({**_OK, "alpha": True}, "alpha must be a number, got bool"),
        ({**_OK, "alpha": "2"}, "alpha must be a number, got str"),
        ({**_OK, "value": None}, "value must be a number, got NoneType"),
        ({**_OK, "direction": []}, "direction is empty"),
        ({**_OK, "direction": [0.0] * 33}, "33 entries, more than max_width=32"),
        ({**_OK, "direction": "1,2"}, "direction must be a list of numbers, got str"),
        ({**_OK, "direction": {"0": 1.0}}, "direction must be a list of numbers, got dict"),
        ({**_OK, "direction": [1.0, "x"]}, r"direction\[1\] must be a number, got str"),
        ({**_OK, "direction": [1.0, None]}, r"direction\[1\] must be a number, got NoneType"),
        ({**_OK, "direction": [[1.0]]}, r"direction\[0\] must be a number, got list"),
        ({**_OK, "direction": [False]}, r"direction\[0\] must be a number, got bool"),
        ({**_OK, "direction": [1.0, math.inf]}, r"direction\[1\] must be finite"),
        ({**_OK, "direction": [10**400]}, r"direction\[0\] must be a finite number"),
        ({**_OK, "tap": 3}, "tap must be a string"),
        ({**_OK, "tap": ""}, "non-empty"),
        ({**_OK, "tap": "fc2:sideways"}, "site must be one of"),
        ({**_OK, "tap": "a" * 513}, "at most 512"),
        ({**_OK, "id": 5}, "id must be a string"),
        ({**_OK, "op": "clamp"}, "clamp needs w_enc"),
        ({**_OK, "w_enc": [1.0]}, "clamp only"),
        ({**_OK, "source": "fc1:in"}, "clamp only"),
        ({**_OK, "op": "clamp", "w_enc": [1.0], "source": "fc1:up"}, "source: .*site must be one of"),
        ({**_OK, "op": "clamp", "w_enc": [0.0] * 40}, "w_enc has 40 entries"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(msg: object, match: str) -> None:
    with pytest.raises(SteerError, match=match):
        Intervention.from_msg(msg, max_width=32)


def test_exported_names() -> None:
    assert sorted(steer_mod.__all__) == sorted(
        ["SteerError", "Steer", "add", "scale", "ablate", "clamp", "steer_latent", "Intervention", "from_transcoder", "OPS"]
    )
    assert issubclass(SteerError, ValueError)


@pytest.mark.parametrize("arch, norm", [("jumprelu", "none"), ("topk", "none"), ("relu", "layer_norm")])
def test_clamp_is_refused_for_a_transcoder_the_agent_cannot_evaluate(arch: str, norm: str) -> None:
    # the agent evaluates relu(x w_enc + b_enc) for a clamp: any other encoder would hold the wrong latent
    tc = Transcoder(4, 3, 5, arch=arch, k=2 if arch == "topk" else None, input_norm=norm)
    with pytest.raises(SteerError, match=f"{arch}.*use add or ablate"):
        from_transcoder(tc, 1, tap="fc2:in", op="clamp", value=1.0, source="fc1:in")
    assert from_transcoder(tc, 1, tap="fc2:in", op="add", alpha=1.0).op == "add"
