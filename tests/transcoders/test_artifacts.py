"""Artifacts from outside: every field checked before anything is built, one line naming the file
and the field, never a traceback and never a silently broadcast weight."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from safetensors.torch import load_file, save_file

from monitor.transcoders.artifacts import WEIGHTS, ArtifactError, load_artifact, save_artifact
from monitor.transcoders.model import Transcoder


def _good(tmp: Path, name: str = "good", *, arch: str = "relu") -> Path:
    torch.manual_seed(0)
    m = Transcoder(6, 4, 5, arch=arch, k=2 if arch == "topk" else None)
    return save_artifact(tmp / name, m, source="a:out", target="b:out", run="r")


def _edit_weights(path: Path, **change: torch.Tensor | None) -> None:
    w = load_file(str(path / WEIGHTS))
    for k, v in change.items():
        if v is None:
            del w[k]
        else:
            w[k] = v
    save_file(w, str(path / WEIGHTS))


def _edit_cfg(path: Path, **change: object) -> None:
    cfg = json.loads((path / "cfg.json").read_text())
    cfg.update(change)
    (path / "cfg.json").write_text(json.dumps(cfg))


def _import(path: Path, redis_url: str) -> subprocess.CompletedProcess:
    """`interlatent import PATH` for run r, a:out -> b:out, as a user runs it."""
    cmd = [sys.executable, "-m", "monitor", "import", str(path), "--run", "r", "--source", "a:out", "--target", "b:out"]
    return subprocess.run([*cmd, "--redis", redis_url], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_good_artifact_loads_exactly(tmp_path: Path) -> None:
    model, cfg = load_artifact(_good(tmp_path))
    torch.manual_seed(0)
    ref = Transcoder(6, 4, 5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(model, name), getattr(ref, name)), name
    assert (model.d_in, model.d_sae, model.d_out, cfg["d_sae"]) == (6, 4, 5, 4)


@pytest.mark.parametrize(
    "breakage, field",
    [
        (lambda p: _edit_weights(p, W_dec=torch.zeros(1, 5)), "W_dec"),  # broadcastable: copy_ would have taken it
        (lambda p: _edit_weights(p, W_dec=torch.zeros(4, 7)), "tensor W_dec has shape"),  # W_dec named, not b_dec
        (lambda p: _edit_weights(p, b_enc=torch.zeros(1)), "b_enc"),
        (lambda p: _edit_weights(p, b_dec=torch.zeros(4)), "b_dec"),
        (lambda p: _edit_weights(p, W_enc=torch.zeros(6, 4, 1)), "W_enc"),
        (lambda p: _edit_weights(p, b_dec=None), "b_dec"),
        (lambda p: _edit_weights(p, W_enc=torch.zeros(6, 4, dtype=torch.int32)), "W_enc"),
        (lambda p: _edit_weights(p, b_enc=torch.tensor([0.0, float("nan"), 0.0, 0.0])), "b_enc"),
        (lambda p: _edit_cfg(p, d_sae=8), "d_sae"),
        (lambda p: _edit_cfg(p, d_in="6"), "d_in"),
        (lambda p: _edit_cfg(p, architecture="topk", k=0), "k"),
        (lambda p: (p / "cfg.json").write_text("{not json"), "JSON"),
        (lambda p: (p / "cfg.json").write_text("[1, 2]"), "JSON object"),
        (lambda p: (p / WEIGHTS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad"), "safetensors"),
    ],
)
def test_each_broken_field_is_refused_by_name(tmp_path: Path, breakage, field: str) -> None:
    path = _good(tmp_path)
    breakage(path)
    with pytest.raises(ArtifactError, match=field) as e:
        load_artifact(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_import_refuses_with_one_line_and_registers_nothing(tmp_path: Path, redis_url: str, store) -> None:
    path = _good(tmp_path)
    _edit_weights(path, W_dec=torch.zeros(1, 5))
    r = _import(path, redis_url)
    assert r.returncode == 2 and "W_dec" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert store.transcoders(include_broken=True) == []
    assert _import(_good(tmp_path, "fine"), redis_url).returncode == 0
    (entry,) = store.transcoders()
    assert entry["active"] is True and entry["architecture"] == "relu"  # listed as active from the start


def test_import_refuses_a_source_width_that_is_not_the_taps(tmp_path: Path, redis_url: str, store) -> None:
    import numpy as np

    from agent_side.wire import encode_act
    from monitor.service.ingest import Monitor

    mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
    try:  # run r streams a:out 7 wide; the artifact reads 6
        pos = np.array([[0, 0], [1, 0]], dtype=np.int64)
        assert mon.handle(encode_act("r", "p", 0, 0, "a:out", np.ones((2, 7), np.float32), pos))
        mon.flush(final=True)
    finally:
        mon.close()
    r = _import(_good(tmp_path), redis_url)
    assert r.returncode == 2 and "source width is 6" in r.stderr and "7 wide" in r.stderr
    assert store.transcoders(include_broken=True) == []


def test_saelens_apply_b_dec_to_input_is_encoded_as_saelens_does(tmp_path: Path) -> None:
    """SAELens' standard SAE with apply_b_dec_to_input: relu((x - b_dec) W_enc + b_enc); with it
    false, relu(x W_enc + b_enc). A sparsify transcoder (transcode: true) subtracts nothing."""
    g = torch.Generator().manual_seed(1)
    W_enc, b_enc, W_dec, b_dec = (
        torch.randn(6, 4, generator=g),
        torch.randn(4, generator=g),
        torch.randn(4, 6, generator=g),
        torch.randn(6, generator=g),
    )
    x = torch.randn(5, 6, generator=g)
    for apply, sae_in in ((True, x - b_dec), (False, x)):
        d = tmp_path / f"sl-{apply}"
        d.mkdir()
        save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, str(d / WEIGHTS))
        (d / "cfg.json").write_text(
            json.dumps({"architecture": "standard", "d_in": 6, "d_sae": 4, "apply_b_dec_to_input": apply})
        )
        m, _ = load_artifact(d)
        with torch.no_grad():
            torch.testing.assert_close(m.encode(x), torch.relu(sae_in @ W_enc + b_enc), atol=1e-5, rtol=1e-5)
    d = tmp_path / "sparsify-transcoder"
    d.mkdir()
    save_file(
        {"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec},
        str(d / "sae.safetensors"),
    )
    (d / "cfg.json").write_text(json.dumps({"k": 2, "num_latents": 4, "transcode": True}))
    m, _ = load_artifact(d)
    pre = x @ W_enc + b_enc
    top = torch.topk(pre, 2, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(m.encode(x), torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values)))


@pytest.mark.parametrize(
    "cfg, tensors, field",
    [
        ({"architecture": "batchtopk"}, {}, "architecture 'batchtopk' is a training architecture"),
        ({"architecture": "matching_pursuit"}, {}, "architecture 'matching_pursuit'"),
        ({"architecture": "temporal"}, {}, "architecture 'temporal'"),
        ({"architecture": "abstopk"}, {}, "architecture 'abstopk'"),
        ({"architecture": "fancy"}, {}, "architecture 'fancy' is not supported"),
        ({"architecture": "jumprelu"}, {}, "tensor threshold is missing"),
        ({"architecture": "gated"}, {}, "tensor b_gate is missing"),
        ({"architecture": "skip_transcoder"}, {}, "tensor W_skip is missing"),
        ({"normalize_activations": "expected_average_only_in"}, {}, "normalize_activations 'expected_average_only_in'"),
        ({"normalize_activations": "covariance_whitening"}, {}, "normalize_activations 'covariance_whitening'"),
        ({"normalize_activations": "batch_norm"}, {}, "normalize_activations 'batch_norm'"),
        ({"reshape_activations": "hook_q"}, {}, "reshape_activations"),
        ({"rescale_acts_by_decoder_norm": True}, {}, "rescale_acts_by_decoder_norm applies to topk"),
        ({"rescale_acts_by_decoder_norm": "yes"}, {}, "rescale_acts_by_decoder_norm must be bool"),
        ({"architecture": "transcoder", "apply_b_dec_to_input": True}, {}, "apply_b_dec_to_input"),
        ({"apply_b_dec_to_input": 1}, {}, "apply_b_dec_to_input must be bool"),
        ({}, {"W_skip": torch.zeros(5, 6)}, "tensor W_skip is not part of a transcoder"),
        ({}, {"threshold": torch.zeros(4)}, "tensor threshold is not part of a transcoder"),
        ({}, {"scaling_factor": torch.full((4,), 2.0)}, "scaling_factor"),
        ({"architecture": "skip_transcoder"}, {"W_skip": torch.zeros(6, 5)}, "tensor W_skip has shape"),
        ({"architecture": "jumprelu"}, {"threshold": torch.zeros(3)}, "tensor threshold has shape"),
    ],
)
def test_what_is_not_encoded_exactly_is_refused_by_name(tmp_path: Path, cfg: dict, tensors: dict, field: str) -> None:
    path = _good(tmp_path)
    _edit_cfg(path, **cfg)
    if tensors:
        _edit_weights(path, **tensors)
    with pytest.raises(ArtifactError, match=field):
        load_artifact(path)


def test_import_refuses_a_tap_the_known_run_does_not_stream_and_says_when_it_replaces(
    tmp_path: Path, redis_url: str, store
) -> None:
    import numpy as np

    from agent_side.wire import encode_act
    from monitor.service.ingest import Monitor

    mon = Monitor(store, endpoint="tcp://127.0.0.1:0")
    try:  # run r streams a:out (6 wide) and b:out (5 wide)
        pos = np.array([[0, 0]], dtype=np.int64)
        assert mon.handle(encode_act("r", "p", 0, 0, "a:out", np.ones((1, 6), np.float32), pos))
        assert mon.handle(encode_act("r", "p", 1, 0, "b:out", np.ones((1, 5), np.float32), pos))
        mon.flush(final=True)
    finally:
        mon.close()
    cmd = [sys.executable, "-m", "monitor", "import", str(_good(tmp_path)), "--run", "r", "--redis", redis_url]
    r = subprocess.run([*cmd, "--source", "a:uot", "--target", "b:out"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "streams no tap 'a:uot'" in r.stderr and "did you mean a:out" in r.stderr
    assert store.transcoders(include_broken=True) == []
    first = subprocess.run(
        [*cmd, "--source", "a:out", "--target", "b:out", "--name", "t"], cwd=ROOT, capture_output=True, text=True
    )
    again = subprocess.run(
        [*cmd, "--source", "a:out", "--target", "b:out", "--name", "t"], cwd=ROOT, capture_output=True, text=True
    )
    assert first.stdout.startswith("registered t") and again.stdout.startswith("replaced t")
