"""Sparse transcoders: ``latents = relu(x W_enc + b_enc)``, ``target ≈ latents W_dec + b_dec``.

An SAE is the case source == target. ``arch="topk"`` keeps the k largest pre-activations of each
row instead of adding an L1 penalty. Encoding is a pure function of the weights and the input.
Defaults follow the seed post: L1 1e-5, 50 epochs, batch 256, Adam 1e-3.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Transcoder", "TrainConfig", "train_transcoder", "quality"]

log = logging.getLogger(__name__)


class Transcoder(nn.Module):
    def __init__(self, d_in: int, d_sae: int, d_out: int, *, arch: str = "relu", k: int | None = None) -> None:
        super().__init__()
        if arch not in ("relu", "topk"):
            raise ValueError(f"arch must be 'relu' or 'topk', got {arch!r}")
        if arch == "topk" and not (k and 0 < k <= d_sae):
            raise ValueError(f"topk needs 0 < k <= d_sae, got k={k}")
        self.arch, self.k = arch, k
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        nn.init.kaiming_uniform_(self.W_enc, a=5**0.5)
        nn.init.kaiming_uniform_(self.W_dec, a=5**0.5)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.addmm(self.b_enc, x, self.W_enc) if x.dim() == 2 else x @ self.W_enc + self.b_enc
        if self.arch == "topk":
            top = torch.topk(pre, self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return pre.relu_() if not pre.requires_grad else torch.relu(pre)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return z, self.decode(z)


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
