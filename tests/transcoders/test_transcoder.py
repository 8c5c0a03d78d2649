"""Transcoders: recover a planted sparse code; artifacts in SAELens and sparsify layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from monitor.transcoders.artifacts import ArtifactError, load_artifact, save_artifact
from monitor.transcoders.model import TrainConfig, Transcoder, quality, train_transcoder


def _planted(n: int = 6000, d: int = 24, latents: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((latents, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    codes = (rng.random((n, latents)) < 0.15) * rng.uniform(1.0, 3.0, (n, latents))
    return (codes @ D).astype(np.float32), D


def test_training_recovers_a_planted_sparse_code() -> None:
    x, D = _planted()
    # twice overcomplete, as SAEs are trained: with exactly 6 latents some die in local minima
    model, hist = train_transcoder(x, x, TrainConfig(d_sae=12, l1=3e-3, epochs=60, lr=3e-3, seed=1), progress=False)
    learned = model.W_dec.detach().numpy()
    learned = learned / np.linalg.norm(learned, axis=1, keepdims=True)
    cos = learned @ D.T  # [learned, planted]
    best = cos.max(axis=0)  # every planted direction has a learned column pointing along it
    assert best.min() > 0.95, best
    assert len(set(cos.argmax(axis=0).tolist())) == 6  # a different column for each planted latent
    q = quality(model, x, x)
    assert q["fvu"] < 0.01 and 0.9 < q["l0"] < 2.5  # the planted code has 0.9 active latents a row
    assert hist["val_loss"][-1] <= hist["val_loss"][0]


def test_training_is_deterministic_and_topk_keeps_k() -> None:
    x, _ = _planted(n=800)
    a, _ = train_transcoder(x, x, TrainConfig(d_sae=8, epochs=3, seed=7), progress=False)
    b, _ = train_transcoder(x, x, TrainConfig(d_sae=8, epochs=3, seed=7), progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    t, _ = train_transcoder(x, x, TrainConfig(d_sae=8, epochs=3, arch="topk", k=2), progress=False)
    z = t.encode(torch.as_tensor(x))
    assert int((z > 0).sum(-1).max()) <= 2


def test_streaming_encode_equals_batch_encode() -> None:
    torch.manual_seed(0)
    m = Transcoder(16, 32, 8)
    x = torch.randn(300, 16)
    with torch.no_grad():
        whole = m.encode(x)
        parts = torch.cat([m.encode(x[i : i + 7]) for i in range(0, 300, 7)])
    assert torch.equal(whole, parts)


def test_artifact_round_trip(tmp_path: Path) -> None:
    m = Transcoder(4, 3, 64, arch="topk", k=2)
    save_artifact(tmp_path / "a", m, source="fc1:in", target="fc1:out", run="r", extra={"l1": 1e-5})
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"], cfg["architecture"], cfg["hook_name"]) == (4, 3, 64, "topk", "fc1:in")
    back, cfg2 = load_artifact(tmp_path / "a")
    assert cfg2["metadata"]["target"] == "fc1:out" and back.arch == "topk" and back.k == 2
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(back(x)[1], m(x)[1])


def test_saelens_and_sparsify_directories_load(tmp_path: Path) -> None:
    rng = torch.Generator().manual_seed(0)
    W_enc, b_enc = torch.randn(8, 5, generator=rng), torch.randn(5, generator=rng)
    W_dec, b_dec = torch.randn(5, 8, generator=rng), torch.randn(8, generator=rng)
    x = torch.randn(4, 8, generator=rng)
    expected = torch.relu(x @ W_enc + b_enc) @ W_dec + b_dec
    sl = tmp_path / "saelens"
    sl.mkdir()
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, str(sl / "sae_weights.safetensors"))
    (sl / "cfg.json").write_text(
        json.dumps({"architecture": "standard", "d_in": 8, "d_sae": 5, "hook_name": "blocks.0.hook_resid_pre"})
    )
    m, _ = load_artifact(sl)
    with torch.no_grad():  # SAELens's default apply_b_dec_to_input is true: it encodes x - b_dec
        torch.testing.assert_close(m(x)[1], torch.relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec)
    cfg = json.loads((sl / "cfg.json").read_text())
    (sl / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": False}))
    m, _ = load_artifact(sl)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[1], expected)
    sp = tmp_path / "sparsify"
    sp.mkdir()
    save_file(
        {"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec},
        str(sp / "sae.safetensors"),
    )
    (sp / "cfg.json").write_text(json.dumps({"expansion_factor": 1, "k": 2, "num_latents": 5}))
    m, _ = load_artifact(sp)
    assert m.arch == "topk" and m.k == 2
    pre = (x - b_dec) @ W_enc + b_enc  # a sparsify SAE (not a transcoder) subtracts b_dec before encoding
    top = torch.topk(pre, 2, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    with torch.no_grad():
        torch.testing.assert_close(m(x)[1], z @ W_dec + b_dec)


def test_pickle_weights_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "old"
    d.mkdir()
    torch.save({"W_enc": torch.zeros(2, 2)}, d / "transcoder_layer2_4dim.pth")
    with pytest.raises(ArtifactError, match="never loads pickle"):
        load_artifact(d)
    with pytest.raises(ArtifactError, match="not a directory"):
        load_artifact(tmp_path / "missing")
