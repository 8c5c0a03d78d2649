"""Transcoder artifacts on disk: ``cfg.json`` + ``sae_weights.safetensors`` as SAELens writes them
(``W_enc`` [d_in, d_sae], ``b_enc``, ``W_dec`` [d_sae, d_out], ``b_dec``, and per architecture
``threshold``, ``b_gate``/``r_mag``/``b_mag``, ``W_skip``).

:func:`load_artifact` reads SAELens's architectures standard, topk, jumprelu, gated, transcoder,
skip_transcoder, jumprelu_transcoder and jumprelu_skip_transcoder with their input options
(``apply_b_dec_to_input``, ``normalize_activations`` none/layer_norm/constant_norm_rescale,
``rescale_acts_by_decoder_norm``), and sparsify's ``SparseCoder`` (``encoder.weight`` [d_sae,
d_in], topk or groupmax, ``b_dec`` subtracted at encode unless ``transcode``, ``W_skip``); each
encodes as its library encodes (tests/transcoders/test_peers.py checks against both libraries).
Everything else is refused by name, every field is checked before anything is built, and nothing
here runs pickle: a directory holding only ``.pt`` / ``.bin`` / ``.pkl`` weights is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from monitor.transcoders.model import INPUT_NORMS, Transcoder

__all__ = ["save_artifact", "load_artifact", "ArtifactError"]

WEIGHTS = "sae_weights.safetensors"
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


class ArtifactError(RuntimeError):
    """An artifact directory that cannot be loaded; the message says why and what to do."""


# SAELens's architecture names for what we can write, by (activation, transcoder, skip)
_SAELENS_NAME = {
    ("relu", False, False): "standard",
    ("topk", False, False): "topk",
    ("jumprelu", False, False): "jumprelu",
    ("gated", False, False): "gated",
    ("relu", True, False): "transcoder",
    ("relu", True, True): "skip_transcoder",
    ("jumprelu", True, False): "jumprelu_transcoder",
    ("jumprelu", True, True): "jumprelu_skip_transcoder",
}
# the cfg.json semantics we write are SAELens 6's: without a version, SAELens applies its pre-6
# defaults (apply_b_dec_to_input true) and would encode our SAEs differently
SAELENS_CFG_VERSION = "6.0.0"
FORMAT_VERSION = 2


def save_artifact(
    directory: Path | str, model: Transcoder, *, source: str, target: str, run: str = "", extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` as SAELens writes one (``cfg.json`` + ``sae_weights.safetensors``), so
    ``sae_lens.SAE.load_from_disk`` loads it and encodes it as we do. A transcoder (source !=
    target) is written under SAELens's transcoder architectures; a topk transcoder, which SAELens
    has no class for, keeps ``"architecture": "topk"`` with ``d_out`` and loads only here."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    transcoder = source != target or model.d_in != model.d_out
    if model.input_norm != "none":
        raise ArtifactError(f"cannot write a transcoder with input normalization {model.input_norm!r}")
    arch = _SAELENS_NAME.get((model.arch, transcoder, model.W_skip is not None))
    if arch is None and (model.arch, model.W_skip) == ("topk", None):
        arch = "topk"
    if arch is None:
        raise ArtifactError(
            f"cannot write a {model.arch} transcoder{' with a skip connection' if model.W_skip is not None else ''}"
        )
    save_file({k: v.detach().contiguous().float() for k, v in model.state_dict().items()}, str(d / WEIGHTS))
    meta = {"hook_name": source, "sae_lens_version": SAELENS_CFG_VERSION, "interlatent_version": FORMAT_VERSION}
    if transcoder:
        meta["hook_name_out"] = target
    cfg = {
        "architecture": arch,
        "d_in": model.d_in,
        "d_sae": model.d_sae,
        "d_out": model.d_out,
        "k": model.k,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "dtype": "float32",
        "device": "cpu",
        "hook_name": source,
        "metadata": {**meta, "source": source, "target": target, "run": run, "transcoder": transcoder, **(extra or {})},
    }
    (d / "cfg.json").write_text(json.dumps(cfg, indent=1))
    return d


def load_artifact(directory: Path | str) -> tuple[Transcoder, dict[str, Any]]:
    """A transcoder and its config from an Interlatent, SAELens or sparsify directory, encoding
    exactly as that library encodes (see ARCHITECTURES); anything else is refused by name."""
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
    cfg_path = d / "cfg.json"
    cfg = _read_cfg(cfg_path)
    named = [d / n for n in (WEIGHTS, SPARSIFY_WEIGHTS) if (d / n).exists()]
    if not named and len(tensors) > 1:
        raise ArtifactError(
            f"{d}: which weights? none is named {WEIGHTS} or {SPARSIFY_WEIGHTS}, and there are {', '.join(p.name for p in tensors)}"
        )
    path = named[0] if named else tensors[0]
    try:
        w = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ArtifactError(f"{path}: not a readable safetensors file ({str(e)[:120]})") from e
    for key, tensor in w.items():
        if not tensor.is_floating_point():
            raise ArtifactError(f"{path}: tensor {key} has dtype {str(tensor.dtype).removeprefix('torch.')}, not a float type")
        if not torch.isfinite(tensor).all():
            raise ArtifactError(f"{path}: tensor {key} holds NaN or Inf")
    if "encoder.weight" in w:
        model = _from_sparsify(path, cfg_path, cfg, w)
    elif "W_enc" in w or "architecture" in cfg:
        model = _from_saelens(path, cfg_path, cfg, w)
    else:
        raise ArtifactError(
            f"{path}: weights have none of the known layouts (W_enc... or encoder.weight...); keys: {sorted(w)[:8]}"
        )
    return model.eval(), cfg


SPARSIFY_WEIGHTS = "sae.safetensors"

# what each SAELens architecture is here: (activation, transcoder, skip); the refused ones by name
_SAELENS_ARCHS = {name: key for key, name in _SAELENS_NAME.items()}
_SAELENS_REFUSED = {
    "batchtopk": "a training architecture; SAELens saves it for inference as jumprelu: load that",
    "matryoshka_batchtopk": "a training architecture; SAELens saves it for inference as jumprelu: load that",
    "abstopk": "not supported (top-k by absolute value)",
    "temporal": "not supported (it encodes across tokens)",
    "matching_pursuit": "not supported (iterative encoding)",
}
_NORMS_REFUSED = {
    "expected_average_only_in": "needs the dataset's norm scaling factor, which is not in the artifact: fold it in "
    "(SAELens's fold_activation_norm_scaling_factor) and save with normalize_activations none",
    "covariance_whitening": "needs the whitening matrices, which are not in the artifact: fold them in "
    "(SAELens's fold_activation_whitening) and save with normalize_activations none",
}


def _ours(cfg: dict[str, Any]) -> bool:
    meta = cfg.get("metadata")
    return isinstance(meta, dict) and ("interlatent_version" in meta or {"source", "target", "transcoder"} <= set(meta))


def _saelens_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """What SAELens's ``handle_config_defaulting`` makes of a cfg.json without ``sae_lens_version``
    (written before SAELens 6): ``activation_fn_str: topk`` with ``activation_fn_kwargs.k`` is a topk SAE."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = cfg.get("sae_lens_version") or meta.get("sae_lens_version")
    if version or _ours(cfg):
        return cfg
    out = dict(cfg)
    fn = out.get("activation_fn", out.get("activation_fn_str"))
    kwargs = out.get("activation_fn_kwargs")
    if fn == "topk" and isinstance(kwargs, dict) and kwargs.get("k") is not None:
        out.setdefault("architecture", "topk")
        out.setdefault("k", kwargs["k"])
    return out


def _field(cfg_path: Path, cfg: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    v = cfg.get(name, default)
    if v is None:
        return default
    if type(v) not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ArtifactError(f"{cfg_path}: field {name} must be {getattr(kind, '__name__', kind)}, got {v!r:.40}")
    return v


def _from_saelens(path: Path, cfg_path: Path, raw: dict[str, Any], w: dict[str, torch.Tensor]) -> Transcoder:
    cfg = _saelens_defaults(raw)
    arch_name = _field(cfg_path, cfg, "architecture", str, "standard")
    if arch_name in _SAELENS_REFUSED:
        raise ArtifactError(f"{cfg_path}: field architecture {arch_name!r} is {_SAELENS_REFUSED[arch_name]}")
    if arch_name not in _SAELENS_ARCHS:
        raise ArtifactError(
            f"{cfg_path}: field architecture {arch_name!r:.40} is not supported (supported: {', '.join(_SAELENS_ARCHS)})"
        )
    arch, transcoder, skip = _SAELENS_ARCHS[arch_name]
    norm = _field(cfg_path, cfg, "normalize_activations", str, "none")
    if norm in _NORMS_REFUSED:
        raise ArtifactError(f"{cfg_path}: field normalize_activations {norm!r} {_NORMS_REFUSED[norm]}")
    if norm not in INPUT_NORMS:
        raise ArtifactError(f"{cfg_path}: field normalize_activations {norm!r:.40} is not one of {', '.join(INPUT_NORMS)}")
    reshape = _field(cfg_path, cfg, "reshape_activations", str, "none")
    if reshape not in ("none", "hook_z"):  # hook_z: SAELens flattens [.., heads, d_head]; our rows are already flat
        raise ArtifactError(f"{cfg_path}: field reshape_activations {reshape!r:.40} is not none or hook_z")
    _field(cfg_path, cfg, "dtype", str, "float32")
    # SAELens's default is true (SAEConfig), a transcoder must say false; our artifacts written
    # before the field existed never subtracted b_dec
    b_dec_in = _field(cfg_path, cfg, "apply_b_dec_to_input", bool, not transcoder and not _ours(cfg))
    if b_dec_in and transcoder:
        raise ArtifactError(f"{cfg_path}: field apply_b_dec_to_input is true, which SAELens refuses for a {arch_name}")
    rescale = _field(cfg_path, cfg, "rescale_acts_by_decoder_norm", bool, False)
    if rescale and arch != "topk":
        raise ArtifactError(f"{cfg_path}: field rescale_acts_by_decoder_norm applies to topk SAEs only, not {arch_name}")
    scaling = w.get("scaling_factor")
    if scaling is not None and not torch.equal(scaling, torch.ones_like(scaling)):
        raise ArtifactError(f"{path}: tensor scaling_factor (a finetuning scaling factor) is not supported")
    names = ["W_enc", "W_dec", "b_dec"] + {"gated": ["b_gate", "r_mag", "b_mag"], "jumprelu": ["b_enc"]}.get(arch, ["b_enc"])
    if arch == "jumprelu":
        names.append("log_threshold" if "log_threshold" in w and "threshold" not in w else "threshold")
    if skip:
        names.append("W_skip")
    _exactly(path, w, names, {"scaling_factor"}, arch_name)
    t = {n: w[n].float() for n in names}
    if "log_threshold" in t:  # what SAELens's process_state_dict_for_loading does with older checkpoints
        t["threshold"] = t.pop("log_threshold").exp()
    # the weight matrices against cfg.json first, so a wrong one is named rather than the bias that then disagrees
    d_in, d_sae = _dims(path, t["W_enc"], "W_enc", want=(("d_in", cfg.get("d_in")), ("d_sae", cfg.get("d_sae"))))
    out_field = "d_out" if cfg.get("d_out") is not None or transcoder else "d_in"
    d_out = _dims(path, t["W_dec"], "W_dec", rows=d_sae, want=(("", None), (out_field, cfg.get(out_field))))[1]
    want = {"b_dec": [d_out], "b_enc": [d_sae], "threshold": [d_sae], "b_gate": [d_sae], "r_mag": [d_sae], "b_mag": [d_sae]}
    want["W_skip"] = [d_out, d_in]
    _shapes(path, t, want)
    _cfg_dims(cfg_path, cfg, d_in=d_in, d_sae=d_sae, d_out=d_out)
    k = None
    if arch == "topk":
        k = cfg.get("k")
        if not (type(k) is int and 1 <= k <= d_sae):
            raise ArtifactError(f"{cfg_path}: field k must be an int in [1, {d_sae}] for a topk SAE, got {k!r:.40}")
    if b_dec_in:
        # SAELens encodes (x - b_dec) W_enc + b: the same as x W_enc + (b - b_dec W_enc)
        if d_in != d_out:
            raise ArtifactError(f"{cfg_path}: apply_b_dec_to_input is true, but d_in {d_in} != d_out {d_out}")
        shift = t["b_dec"].double() @ t["W_enc"].double()
        for b in ("b_gate", "b_mag") if arch == "gated" else ("b_enc",):
            scale = t["r_mag"].double().exp() if b == "b_mag" else 1.0
            t[b] = (t[b].double() - shift * scale).float()
    if rescale:  # SAELens's fold_W_dec_norm: top-k of pre * |W_dec row|, decoded by z / |W_dec row|
        norms = t["W_dec"].norm(dim=-1)
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * norms, t["b_enc"] * norms, t["W_dec"] / norms[:, None]
    model = Transcoder(d_in, d_sae, d_out, arch=arch, k=k, skip=skip, input_norm=norm, denorm_output=not transcoder)
    return _filled(model, t)


def _from_sparsify(path: Path, cfg_path: Path, cfg: dict[str, Any], w: dict[str, torch.Tensor]) -> Transcoder:
    """sparsify's SparseCoder: ``encoder`` an nn.Linear(d_in, num_latents), ``W_dec`` [num_latents,
    d_in], ``b_dec`` [d_in] subtracted from the input unless ``transcode``, an optional ``W_skip``
    [d_in, d_in]; the activation ``topk`` or ``groupmax`` after a relu (SparseCoderConfig's defaults
    where cfg.json is silent, as sparsify reads it)."""
    activation = _field(cfg_path, cfg, "activation", str, "topk")
    if activation not in ("topk", "groupmax"):
        raise ArtifactError(f"{cfg_path}: field activation {activation!r:.40} is not topk or groupmax")
    transcode = _field(cfg_path, cfg, "transcode", bool, False)
    skip = _field(cfg_path, cfg, "skip_connection", bool, False)
    k = _field(cfg_path, cfg, "k", int, 32)
    names = ["encoder.weight", "encoder.bias", "W_dec", "b_dec"] + (["W_skip"] if skip else [])
    _exactly(path, w, names, set(), f"sparsify {'transcoder' if transcode else 'SAE'}")
    t = {n: w[n].float() for n in names}
    d_sae, d_in = _dims(path, t["encoder.weight"], "encoder.weight")
    d_out = _dims(path, t["W_dec"], "W_dec", rows=d_sae)[1]
    _shapes(path, t, {"encoder.bias": [d_sae], "b_dec": [d_out], "W_skip": [d_out, d_in]})
    _cfg_dims(cfg_path, cfg, d_in=d_in, d_sae=cfg.get("num_latents") and d_sae)
    if not 1 <= k <= d_sae or (activation == "groupmax" and d_sae % k):
        raise ArtifactError(f"{cfg_path}: field k {k} does not fit {d_sae} latents for {activation}")
    W_enc, b_enc = t["encoder.weight"].T.contiguous(), t["encoder.bias"]
    if not transcode:
        if d_in != d_out:
            raise ArtifactError(f"{cfg_path}: a sparsify SAE subtracts b_dec from the input, but d_in {d_in} != d_out {d_out}")
        b_enc = (b_enc.double() - t["b_dec"].double() @ W_enc.double()).float()
    model = Transcoder(d_in, d_sae, d_out, arch=activation, k=k, skip=skip)
    return _filled(model, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": t["W_dec"], "b_dec": t["b_dec"], "W_skip": t.get("W_skip")})


def _exactly(path: Path, w: dict[str, torch.Tensor], names: list[str], ignored: set[str], what: str) -> None:
    missing = [n for n in names if n not in w]
    if missing:
        raise ArtifactError(f"{path}: tensor {missing[0]} is missing (a {what} has {', '.join(names)})")
    extra = sorted(set(w) - set(names) - ignored)
    if extra:
        raise ArtifactError(
            f"{path}: tensor {extra[0]} is not part of a {what} (it has {', '.join(names)}): check cfg.json's architecture"
        )


def _dims(
    path: Path, t: torch.Tensor, name: str, rows: int | None = None, want: tuple[tuple[str, Any], ...] = (("", None), ("", None))
) -> tuple[int, int]:
    """The two dimensions of a weight matrix; ``want`` are cfg.json's, where it states them."""
    if t.dim() != 2 or (rows is not None and t.shape[0] != rows):
        expected = "2 dimensions" if rows is None else f"[{rows}, d_out] (from the other tensors)"
        raise ArtifactError(f"{path}: tensor {name} has shape {list(t.shape)}, expected {expected}")
    for axis, (field, value) in enumerate(want):
        if isinstance(value, int) and t.shape[axis] != value:
            raise ArtifactError(f"{path}: tensor {name} has shape {list(t.shape)}, but cfg.json's field {field} is {value}")
    return int(t.shape[0]), int(t.shape[1])


def _shapes(path: Path, t: dict[str, torch.Tensor], want: dict[str, list[int]]) -> None:
    for name, shape in want.items():
        if name in t and t[name] is not None and list(t[name].shape) != shape:
            raise ArtifactError(
                f"{path}: tensor {name} has shape {list(t[name].shape)}, expected {shape} (from the other tensors)"
            )


def _cfg_dims(cfg_path: Path, cfg: dict[str, Any], **have: int | None) -> None:
    for field, value in have.items():
        if value and cfg.get(field) is not None and cfg[field] != value:
            raise ArtifactError(f"{cfg_path}: field {field} is {cfg[field]}, but the weights say {value}")


def _filled(model: Transcoder, t: dict[str, torch.Tensor | None]) -> Transcoder:
    with torch.no_grad():
        for name, value in t.items():
            param = getattr(model, name, None)
            if value is not None and isinstance(param, torch.nn.Parameter):
                param.copy_(value)
    return model


def _read_cfg(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{path.parent} has no cfg.json") from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({str(e)[:120]})") from e
    if not isinstance(cfg, dict):
        raise ArtifactError(f"{path}: must be a JSON object, got {type(cfg).__name__}")
    for field in ("d_in", "d_sae", "d_out", "num_latents"):
        v = cfg.get(field)
        if v is not None and not (type(v) is int and v > 0) and not (field == "num_latents" and v == 0):
            raise ArtifactError(f"{path}: field {field} must be a positive int, got {v!r:.40}")
    return cfg
