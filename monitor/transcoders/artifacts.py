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
    try:
        cfg = json.loads((d / "cfg.json").read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{d} has no cfg.json") from e
    w = load_file(str(d / WEIGHTS if (d / WEIGHTS).exists() else tensors[0]))
    if "W_enc" in w:  # Interlatent / SAELens
        W_enc, b_enc, W_dec, b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]
    elif "encoder.weight" in w:  # sparsify: encoder is an nn.Linear(d_in, d_sae)
        W_enc, b_enc, W_dec, b_dec = w["encoder.weight"].T, w["encoder.bias"], w["W_dec"], w["b_dec"]
    else:
        raise ArtifactError(f"{d}: weights have none of the known layouts (W_enc... or encoder.weight...); keys: {sorted(w)[:8]}")
    k = cfg.get("k")
    arch = "topk" if cfg.get("architecture") == "topk" or (k and "encoder.weight" in w) else "relu"
    model = Transcoder(W_enc.shape[0], W_enc.shape[1], W_dec.shape[1], arch=arch, k=k if arch == "topk" else None)
    with torch.no_grad():
        model.W_enc.copy_(W_enc)
        model.b_enc.copy_(b_enc)
        model.W_dec.copy_(W_dec)
        model.b_dec.copy_(b_dec)
    return model.eval(), cfg
