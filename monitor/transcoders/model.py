"""Sparse transcoders: ``latents = relu(x W_enc + b_enc)``, ``target ≈ latents W_dec + b_dec``.

An SAE is the case source == target. ``arch="topk"`` keeps the k largest pre-activations of each
row instead of adding an L1 penalty; the other architectures of SAELens and sparsify (JumpReLU,
gated, groupmax, skip connections, input normalization) are encoded too, for imported artifacts;
training makes relu and topk. Encoding is a pure function of the weights and the input.
Defaults follow the seed post: L1 1e-5, 50 epochs, batch 256, Adam 1e-3.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Transcoder", "TrainConfig", "train_transcoder", "quality", "ARCHS", "INPUT_NORMS"]

log = logging.getLogger(__name__)


ARCHS = ("relu", "topk", "jumprelu", "gated", "groupmax")
INPUT_NORMS = ("none", "layer_norm", "constant_norm_rescale")


class Transcoder(nn.Module):
    """Latents of rows ``x`` [rows, d_in] and the reconstruction of the target [rows, d_out].

    ``arch`` is the activation, as SAELens and sparsify define it on ``pre = x W_enc + b_enc``:
    ``relu``; ``topk`` (the k largest, then relu); ``jumprelu`` (``relu(pre)`` where
    ``pre > threshold``); ``gated`` (``relu(x (W_enc exp(r_mag)) + b_mag)`` where
    ``x W_enc + b_gate > 0``); ``groupmax`` (sparsify: the max of each of k contiguous groups).
    ``skip`` adds ``x W_skip^T`` to the reconstruction. ``input_norm`` is SAELens's
    ``normalize_activations`` applied to each row before encoding (``layer_norm``,
    ``constant_norm_rescale``); ``denorm_output`` undoes it on the reconstruction (SAELens's SAEs
    do, its transcoders do not). A library's input-side ``b_dec`` subtraction is folded into the
    encoder bias by the loader, so encoding here is a pure function of the weights and the row.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        d_out: int,
        *,
        arch: str = "relu",
        k: int | None = None,
        skip: bool = False,
        input_norm: str = "none",
        denorm_output: bool = True,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        if arch in ("topk", "groupmax") and not (k and 0 < k <= d_sae):
            raise ValueError(f"{arch} needs 0 < k <= d_sae, got k={k}")
        if arch == "groupmax" and d_sae % k:  # type: ignore[operator]
            raise ValueError(f"groupmax needs d_sae divisible by k, got d_sae={d_sae}, k={k}")
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
        self.arch, self.k, self.input_norm, self.denorm_output = arch, k, input_norm, denorm_output
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        nn.init.kaiming_uniform_(self.W_enc, a=5**0.5)
        nn.init.kaiming_uniform_(self.W_dec, a=5**0.5)
        if arch == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))
        if arch == "gated":
            self.b_gate = nn.Parameter(torch.zeros(d_sae))
            self.r_mag = nn.Parameter(torch.zeros(d_sae))
            self.b_mag = nn.Parameter(torch.zeros(d_sae))
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in)) if skip else None

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def plain(self) -> bool:
        """``relu(x W_enc + b_enc)`` exactly: the form the agent side can evaluate for a clamp."""
        return self.arch == "relu" and self.input_norm == "none"

    def _normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        if self.input_norm == "layer_norm":  # SAELens's run_time_activation_ln_in, eps 1e-5
            mu = x.mean(-1, keepdim=True)
            centred = x - mu
            std = centred.std(-1, keepdim=True)
            return centred / (std + 1e-5), (mu, std)
        if self.input_norm == "constant_norm_rescale":
            coeff = (self.d_in**0.5) / x.norm(dim=-1, keepdim=True)
            return x * coeff, (coeff, coeff)
        return x, None

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch == "gated":
            gate = (x @ self.W_enc + self.b_gate) > 0
            return gate.to(x.dtype) * torch.relu(x @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
        pre = torch.addmm(self.b_enc, x, self.W_enc) if x.dim() == 2 else x @ self.W_enc + self.b_enc
        if self.arch == "topk":
            top = torch.topk(pre, self.k, dim=-1)  # type: ignore[arg-type]
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        if self.arch == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        if self.arch == "groupmax":
            values, idx = torch.relu(pre).unflatten(-1, (self.k, -1)).max(dim=-1)  # type: ignore[arg-type]
            offsets = torch.arange(0, self.d_sae, self.d_sae // self.k, device=pre.device)  # type: ignore[operator]
            return torch.zeros_like(pre).scatter(-1, idx + offsets, values)
        return pre.relu_() if not pre.requires_grad else torch.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._latents(self._normalize(x)[0])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents to the target, before any skip term or de-normalization (see :meth:`forward`)."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, reconstruction), the reconstruction as the library computes it: de-normalized
        where ``denorm_output``, plus the skip connection."""
        n, stats = self._normalize(x)
        z = self._latents(n)
        rec = self.decode(z)
        if stats is not None and self.denorm_output:
            rec = rec * stats[1] + stats[0] if self.input_norm == "layer_norm" else rec / stats[0]
        if self.W_skip is not None:
            rec = rec + x @ self.W_skip.T
        return z, rec


@dataclass(frozen=True)
class TrainConfig:
    d_sae: int
    l1: float = 1e-5
    epochs: int = 50
    batch: int = 256
    lr: float = 1e-3
    seed: int = 0
    val_frac: float = 0.1
    patience: int = 10  # epochs without a better validation loss before stopping
    arch: str = "relu"
    k: int | None = None
    unit_decoder: bool = True  # keep decoder rows at unit norm so the L1 penalty cannot be dodged by scale


def train_transcoder(
    x: np.ndarray, y: np.ndarray, cfg: TrainConfig, *, progress: bool = True
) -> tuple[Transcoder, dict[str, Any]]:
    """Fit a transcoder from source rows ``x`` to target rows ``y``; deterministic for a seed.

    Returns the model with the weights of its best validation epoch, and the loss history.
    """
    from tqdm import tqdm

    if len(x) != len(y) or len(x) < 10:
        raise ValueError(f"need at least 10 paired rows, got {len(x)} source and {len(y)} target rows")
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    xt, yt = torch.as_tensor(np.asarray(x, dtype=np.float32)), torch.as_tensor(np.asarray(y, dtype=np.float32))
    perm = torch.randperm(len(xt), generator=g)
    n_val = max(1, int(len(xt) * cfg.val_frac))
    val, tr = perm[:n_val], perm[n_val:]
    model = Transcoder(xt.shape[1], cfg.d_sae, yt.shape[1], arch=cfg.arch, k=cfg.k)
    with torch.no_grad():
        model.b_dec.copy_(yt[tr].mean(0))  # start from the mean target: the latents only explain the rest
        if cfg.unit_decoder:
            model.W_dec /= model.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    l1 = cfg.l1 if cfg.arch == "relu" else 0.0

    def loss_of(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, rec = model(xb)
        mse = torch.mean((rec - yb) ** 2)
        return mse + l1 * z.abs().sum(-1).mean(), mse

    history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_mse": []}
    best, best_state, stale = float("inf"), None, 0
    bar = tqdm(range(cfg.epochs), desc=f"transcoder d_sae={cfg.d_sae}", disable=not progress, leave=False)
    for _ in bar:
        model.train()
        order = tr[torch.randperm(len(tr), generator=g)]
        total = 0.0
        for i in range(0, len(order), cfg.batch):
            idx = order[i : i + cfg.batch]
            loss, _ = loss_of(xt[idx], yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if cfg.unit_decoder:
                with torch.no_grad():
                    model.W_dec /= model.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
            total += float(loss.detach()) * len(idx)
        model.eval()
        with torch.no_grad():
            vloss, vmse = loss_of(xt[val], yt[val])
        history["train_loss"].append(total / len(tr))
        history["val_loss"].append(float(vloss))
        history["val_mse"].append(float(vmse))
        bar.set_postfix(val_loss=f"{float(vloss):.3g}")
        if float(vloss) < best - 1e-12:
            best, best_state, stale = float(vloss), {k: v.detach().clone() for k, v in model.state_dict().items()}, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    history["epochs_run"] = len(history["val_loss"])
    history["config"] = asdict(cfg)
    history["val_rows"] = val.tolist()
    return model.eval(), history


@torch.no_grad()
def quality(model: Transcoder, x: np.ndarray, y: np.ndarray, *, dense_above: float = 0.5) -> dict[str, float]:
    """MSE, fraction of variance unexplained, L0 (mean active latents per row), and the fractions
    of latents that never fire (dead) or fire on more than ``dense_above`` of the rows (dense)."""
    xt, yt = torch.as_tensor(np.asarray(x, dtype=np.float32)), torch.as_tensor(np.asarray(y, dtype=np.float32))
    z, rec = model(xt)
    err = ((rec - yt) ** 2).sum()
    var = ((yt - yt.mean(0)) ** 2).sum()
    active = (z > 0).float()
    rate = active.mean(0)
    return {
        "mse": float(err / yt.numel()),
        "fvu": float(err / var) if float(var) > 0 else float("nan"),
        "l0": float(active.sum(-1).mean()),
        "dead_frac": float((rate == 0).float().mean()),
        "dense_frac": float((rate > dense_above).float().mean()),
        "rows": len(xt),
    }
