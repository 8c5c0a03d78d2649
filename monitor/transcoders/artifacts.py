"""Transcoder artifacts on disk: ``cfg.json`` + ``sae_weights.safetensors`` with the field names
SAELens users know (``W_enc`` [d_in, d_sae], ``b_enc``, ``W_dec`` [d_sae, d_out], ``b_dec``).

:func:`load_artifact` also reads sparsify's layout (``encoder.weight`` [d_sae, d_in],
``encoder.bias``, ``W_dec``, ``b_dec``, with ``k`` in ``cfg.json``). Nothing here runs pickle: a
directory holding only ``.pt`` / ``.pth`` / ``.bin`` / ``.pkl`` weights is refused with a message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from monitor.transcoders.model import Transcoder

__all__ = ["save_artifact", "load_artifact", "ArtifactError"]

WEIGHTS = "sae_weights.safetensors"
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


class ArtifactError(RuntimeError):
    """An artifact directory that cannot be loaded; the message says why and what to do."""


def save_artifact(
    directory: Path | str, model: Transcoder, *, source: str, target: str, run: str = "", extra: dict[str, Any] | None = None
) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().float() for k, v in model.state_dict().items()}, str(d / WEIGHTS))
    cfg = {
        "architecture": "standard" if model.arch == "relu" else "topk",
        "d_in": model.d_in,
        "d_sae": model.d_sae,
        "d_out": model.d_out,
        "k": model.k,
        "apply_b_dec_to_input": False,  # what SAELens reads; without it, its pre-6 default subtracts b_dec
        "dtype": "float32",
        "hook_name": source,
        "metadata": {"source": source, "target": target, "run": run, "transcoder": source != target, **(extra or {})},
    }
    (d / "cfg.json").write_text(json.dumps(cfg, indent=1))
    return d


def load_artifact(directory: Path | str) -> tuple[Transcoder, dict[str, Any]]:
    """A transcoder and its config from an Interlatent, SAELens or sparsify directory."""
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"{d} is not a directory with cfg.json and *.safetensors")
    tensors = sorted(d.glob("*.safetensors"))
    if not tensors:
        pickles = [p.name for p in d.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise ArtifactError(
                f"{d} holds only pickle weights ({', '.join(pickles)}); Interlatent never loads pickle: "
                "save the tensors with safetensors (W_enc, b_enc, W_dec, b_dec) and a cfg.json"
            )
        raise ArtifactError(f"{d} has no *.safetensors weights")
    cfg = _read_cfg(d / "cfg.json")
    path = d / WEIGHTS if (d / WEIGHTS).exists() else tensors[0]
    try:
        w = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ArtifactError(f"{path}: not a readable safetensors file ({str(e)[:120]})") from e
    if "W_enc" in w:  # Interlatent / SAELens
        names = {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}
    elif "encoder.weight" in w:  # sparsify: encoder is an nn.Linear(d_in, d_sae)
        names = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "W_dec", "b_dec": "b_dec"}
    else:
        raise ArtifactError(
            f"{path}: weights have none of the known layouts (W_enc... or encoder.weight...); keys: {sorted(w)[:8]}"
        )
    missing = [v for v in names.values() if v not in w]
    if missing:
        raise ArtifactError(f"{path}: tensor {missing[0]} is missing (needed: {', '.join(names.values())})")
    got = {k: w[v] for k, v in names.items()}
    if names["W_enc"] == "encoder.weight":
        got["W_enc"] = got["W_enc"].T
    _refuse_unsupported(d / "cfg.json", cfg, w)
    W_enc, b_enc, W_dec, b_dec = _checked(path, names, got, cfg)
    sparsify = names["W_enc"] == "encoder.weight"
    if (cfg.get("apply_b_dec_to_input") is True) or (sparsify and not cfg.get("transcode")):
        # the library encodes (x - b_dec) W_enc + b_enc: the same as x W_enc + (b_enc - b_dec W_enc)
        if W_enc.shape[0] != W_dec.shape[1]:
            raise ArtifactError(
                f"{d / 'cfg.json'}: b_dec is subtracted from the input, but d_in {W_enc.shape[0]} != d_out {W_dec.shape[1]}"
            )
        b_enc = b_enc.double() - b_dec.double() @ W_enc.double()
    k = cfg.get("k")
    arch = "topk" if cfg.get("architecture") == "topk" or (k and "encoder.weight" in w) else "relu"
    if arch == "topk" and not (type(k) is int and 1 <= k <= W_enc.shape[1]):
        raise ArtifactError(f"{d / 'cfg.json'}: field k must be an int in [1, {W_enc.shape[1]}] for a topk SAE, got {k!r:.40}")
    model = Transcoder(W_enc.shape[0], W_enc.shape[1], W_dec.shape[1], arch=arch, k=k if arch == "topk" else None)
    with torch.no_grad():
        model.W_enc.copy_(W_enc)
        model.b_enc.copy_(b_enc)
        model.W_dec.copy_(W_dec)
        model.b_dec.copy_(b_dec)
    return model.eval(), cfg


# what SAELens and sparsify can describe that this loader does not encode: refused by name, never
# encoded some other way
_ARCHITECTURES = (None, "standard", "topk")


def _refuse_unsupported(path: Path, cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    arch = cfg.get("architecture")
    if arch not in _ARCHITECTURES:
        raise ArtifactError(f"{path}: field architecture {arch!r:.40} is not supported (standard and topk are)")
    if cfg.get("normalize_activations") not in (None, "none"):
        raise ArtifactError(
            f"{path}: field normalize_activations {cfg['normalize_activations']!r:.40} is not supported (only none)"
        )
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise ArtifactError(f"{path}: field rescale_acts_by_decoder_norm is not supported")
    if cfg.get("activation") not in (None, "topk"):
        raise ArtifactError(f"{path}: field activation {cfg['activation']!r:.40} is not supported (topk is)")
    extra = sorted(set(weights) & {"W_skip", "threshold", "log_threshold", "r_mag", "b_mag", "b_gate", "W_skip.weight"})
    if extra:
        raise ArtifactError(f"{path.parent}: tensor {extra[0]} (a skip, JumpReLU or gated SAE) is not supported")


def _read_cfg(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{path.parent} has no cfg.json") from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({str(e)[:120]})") from e
    if not isinstance(cfg, dict):
        raise ArtifactError(f"{path}: must be a JSON object, got {type(cfg).__name__}")
    for field in ("d_in", "d_sae", "d_out"):
        v = cfg.get(field)
        if v is not None and not (type(v) is int and v > 0):
            raise ArtifactError(f"{path}: field {field} must be a positive int, got {v!r:.40}")
    return cfg


def _checked(path: Path, names: dict[str, str], t: dict[str, torch.Tensor], cfg: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """The four tensors, each of the shape the others and ``cfg.json`` imply (never broadcast),
    floating point and finite; an :class:`ArtifactError` naming the first that is not."""
    for key, tensor in t.items():
        if not tensor.is_floating_point():
            raise ArtifactError(
                f"{path}: tensor {names[key]} has dtype {str(tensor.dtype).removeprefix('torch.')}, not a float type"
            )
        if tensor.dim() != (2 if key.startswith("W") else 1):
            raise ArtifactError(
                f"{path}: tensor {names[key]} has shape {list(tensor.shape)}, expected {2 if key.startswith('W') else 1} dimensions"
            )
    d_in, d_sae = t["W_enc"].shape
    d_out = t["W_dec"].shape[1]
    want = {"W_enc": [d_in, d_sae], "b_enc": [d_sae], "W_dec": [d_sae, d_out], "b_dec": [d_out]}
    for key, shape in want.items():
        if list(t[key].shape) != shape:
            raise ArtifactError(
                f"{path}: tensor {names[key]} has shape {list(t[key].shape)}, expected {shape} (from the other tensors)"
            )
    for field, value in (("d_in", d_in), ("d_sae", d_sae), ("d_out", d_out)):
        if cfg.get(field) is not None and cfg[field] != value:
            raise ArtifactError(f"{path.parent / 'cfg.json'}: field {field} is {cfg[field]}, but the weights say {value}")
    for key, tensor in t.items():
        if not torch.isfinite(tensor).all():
            raise ArtifactError(f"{path}: tensor {names[key]} holds NaN or Inf")
    return t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"]
