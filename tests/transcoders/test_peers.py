"""Cross-checks against the libraries whose formats we read and write: SAELens and sparsify build
random-weight models of each architecture with their own classes and save them with their own
code; we load them with ours and encode the same rows. And back: what we save, SAELens loads with
``SAE.load_from_disk`` and encodes as we do."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from monitor.transcoders.artifacts import ArtifactError, load_artifact, save_artifact
from monitor.transcoders.model import Transcoder

sae_lens = pytest.importorskip("sae_lens")
sparsify = pytest.importorskip("sparsify")

D_IN, D_SAE, D_OUT, ROWS = 12, 24, 9, 64
TOL = dict(atol=1e-5, rtol=1e-5)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (libraries start biases and skips at zero, which would hide a missing
    term); thresholds small and positive, so some latents pass and some do not."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p is None:
                continue
            if name.endswith("threshold"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5))


def _rows(d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(ROWS, d, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _saelens(arch: str, **cfg: object):
    from sae_lens import SAE
    from sae_lens.registry import get_sae_class

    cls, cfg_cls = get_sae_class(arch)
    transcoder = "transcoder" in arch
    kwargs = {"d_in": D_IN, "d_sae": D_SAE, **({"d_out": D_OUT, "apply_b_dec_to_input": False} if transcoder else {}), **cfg}
    sae = cls(cfg_cls(**kwargs))
    _randomize(sae, zlib.crc32(arch.encode()) % 1000)  # a stable seed (hash() is salted per process)
    assert isinstance(sae, SAE)
    return sae.eval()


def _theirs(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        z = sae.encode(x)
        return z, sae(x)


SAELENS_CASES = [
    ("standard", {"apply_b_dec_to_input": True}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("standard", {"normalize_activations": "layer_norm"}),
    ("standard", {"normalize_activations": "constant_norm_rescale", "apply_b_dec_to_input": False}),
    ("topk", {"k": 5}),
    ("topk", {"k": 5, "apply_b_dec_to_input": False}),
    ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
    ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True, "normalize_activations": "layer_norm"}),
    ("jumprelu", {}),
    ("jumprelu", {"apply_b_dec_to_input": False, "normalize_activations": "layer_norm"}),
    ("gated", {}),
    ("gated", {"apply_b_dec_to_input": False}),
    ("transcoder", {}),
    ("transcoder", {"normalize_activations": "layer_norm"}),
    ("skip_transcoder", {}),
    ("jumprelu_transcoder", {}),
    ("jumprelu_skip_transcoder", {}),
]


@pytest.mark.parametrize(
    "arch, cfg", SAELENS_CASES, ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in c.items())}" for a, c in SAELENS_CASES]
)
def test_saelens_artifacts_encode_as_saelens_encodes(tmp_path: Path, arch: str, cfg: dict) -> None:
    sae = _saelens(arch, **cfg)
    sae.save_model(tmp_path / "sae")
    ours, _ = load_artifact(tmp_path / "sae")
    x = _rows(D_IN)
    z_ref, rec_ref = _theirs(sae, x)
    with torch.no_grad():
        z, rec = ours(x)
        torch.testing.assert_close(ours.encode(x), z)
    active = (z_ref > 0).float().mean()
    assert 0.02 < active < 0.98, f"a degenerate case checks nothing: {active:.2f} of latents active"
    torch.testing.assert_close(z, z_ref, **TOL)
    torch.testing.assert_close(rec, rec_ref, **TOL)


def test_batchtopk_saved_for_inference_loads_as_the_jumprelu_saelens_makes_it(tmp_path: Path) -> None:
    from sae_lens import SAE
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    train = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    _randomize(train, 7)
    train.topk_threshold = torch.tensor(0.4)
    train.save_inference_model(tmp_path / "bt")
    theirs = SAE.load_from_disk(tmp_path / "bt").eval()
    ours, cfg = load_artifact(tmp_path / "bt")
    assert cfg["architecture"] == "jumprelu" and ours.arch == "jumprelu"
    x = _rows(D_IN)
    z_ref, rec_ref = _theirs(theirs, x)
    with torch.no_grad():
        z, rec = ours(x)
    torch.testing.assert_close(z, z_ref, **TOL)
    torch.testing.assert_close(rec, rec_ref, **TOL)


@pytest.mark.parametrize("arch, field", [("abstopk", "abstopk"), ("matching_pursuit", "matching_pursuit")])
def test_saelens_architectures_we_do_not_encode_are_refused_by_name(tmp_path: Path, arch: str, field: str) -> None:
    from sae_lens.registry import get_sae_class

    cls, cfg_cls = get_sae_class(arch)
    kwargs = {"d_in": D_IN, "d_sae": D_SAE, **({"k": 4} if arch == "abstopk" else {})}
    if arch == "matching_pursuit":
        kwargs["residual_threshold"] = 0.1
    sae = cls(cfg_cls(**kwargs))
    sae.save_model(tmp_path / arch)
    with pytest.raises(ArtifactError, match=f"architecture '{field}'"):
        load_artifact(tmp_path / arch)


def test_expected_average_normalization_is_refused_saying_what_to_fold(tmp_path: Path) -> None:
    sae = _saelens("standard", normalize_activations="expected_average_only_in")
    sae.save_model(tmp_path / "ea")
    with pytest.raises(ArtifactError, match="fold_activation_norm_scaling_factor"):
        load_artifact(tmp_path / "ea")


SPARSIFY_CASES = [
    {"activation": "topk", "k": 5},
    {"activation": "topk", "k": 5, "skip_connection": True},
    {"activation": "groupmax", "k": 6},
    {"activation": "topk", "k": 5, "transcode": True},
    {"activation": "topk", "k": 5, "transcode": True, "skip_connection": True},
    {"activation": "groupmax", "k": 4, "transcode": True},
]


@pytest.mark.parametrize("cfg", SPARSIFY_CASES, ids=["-".join(f"{k}={v}" for k, v in c.items()) for c in SPARSIFY_CASES])
def test_sparsify_artifacts_encode_as_sparsify_encodes(tmp_path: Path, cfg: dict) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, **cfg))
    _randomize(coder, 3)
    coder.save_to_disk(tmp_path / "sp")
    ours, _ = load_artifact(tmp_path / "sp")
    x = _rows(D_IN)
    with torch.no_grad():
        top_acts, top_idx, _ = coder.encode(x)
        z_ref = torch.zeros(ROWS, D_SAE).scatter(-1, top_idx, top_acts)
        rec_ref = coder(x).sae_out
        z, rec = ours(x)
    assert (z_ref > 0).float().sum(-1).mean() > 1
    torch.testing.assert_close(z, z_ref, **TOL)
    torch.testing.assert_close(rec, rec_ref, **TOL)


def _ours(arch: str, d_out: int, *, skip: bool = False, k: int | None = None, seed: int = 5) -> Transcoder:
    m = Transcoder(D_IN, D_SAE, d_out, arch=arch, k=k, skip=skip)
    _randomize(m, seed)
    return m.eval()


OURS_CASES = [
    ("relu", D_IN, False, None, "standard"),
    ("topk", D_IN, False, 5, "topk"),
    ("jumprelu", D_IN, False, None, "jumprelu"),
    ("relu", D_OUT, False, None, "transcoder"),
    ("relu", D_OUT, True, None, "skip_transcoder"),
    ("jumprelu", D_OUT, False, None, "jumprelu_transcoder"),
]


@pytest.mark.parametrize("arch, d_out, skip, k, name", OURS_CASES, ids=[c[-1] for c in OURS_CASES])
def test_what_we_save_saelens_loads_and_encodes_as_we_do(
    tmp_path: Path, arch: str, d_out: int, skip: bool, k: int | None, name: str
) -> None:
    from sae_lens import SAE

    ours = _ours(arch, d_out, skip=skip, k=k)
    tgt = "fc1:in" if d_out == D_IN else "fc2:out"
    save_artifact(tmp_path / "ours", ours, source="fc1:in", target=tgt, run="r")
    theirs = SAE.load_from_disk(tmp_path / "ours").eval()
    assert theirs.cfg.architecture() == name
    x = _rows(D_IN)
    z_ref, rec_ref = _theirs(theirs, x)
    with torch.no_grad():
        z, rec = ours(x)
    torch.testing.assert_close(z_ref, z, **TOL)
    torch.testing.assert_close(rec_ref, rec, **TOL)
    back, _ = load_artifact(tmp_path / "ours")  # and we read back what we wrote, unchanged
    with torch.no_grad():
        torch.testing.assert_close(back(x)[1], rec, atol=0, rtol=0)
