"""Taps: a module name plus a site, ``in`` or ``out`` (``mlp_extractor.policy_net.0:in``)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TapSpec", "TapError", "parse_tap", "resolve", "first_tensor", "as_rows", "tensor_hook"]

SITES = ("in", "out")


class TapError(ValueError):
    """A tap that does not name a module of the model, or a malformed tap string."""


@dataclass(frozen=True)
class TapSpec:
    module: str
    site: str

    def __str__(self) -> str:
        return f"{self.module}:{self.site}"


def parse_tap(spec: str) -> TapSpec:
    """``"fc1:out"`` -> ``TapSpec("fc1", "out")``; a bare module name means its output."""
    if not isinstance(spec, str) or not spec.strip():
        raise TapError(f"tap must be a non-empty string like 'fc1:out', got {spec!r}")
    name, sep, site = spec.strip().rpartition(":")
    if not sep:
        name, site = spec.strip(), "out"
    if site not in SITES:
        raise TapError(f"tap {spec!r}: site must be one of {SITES}, got {site!r}")
    return TapSpec(name, site)


def resolve(root: torch.nn.Module, spec: TapSpec) -> torch.nn.Module:
    """The submodule ``spec.module`` names, or a :class:`TapError` listing close matches."""
    modules = dict(root.named_modules())
    if spec.module in modules:
        return modules[spec.module]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(spec.module, names, n=5, cutoff=0.5)
    if not close:
        close = [n for n in names if spec.module.split(".")[-1] in n][:5] or names[:5]
    raise TapError(f"no module named {spec.module!r} in {type(root).__name__}; close matches: {', '.join(close) or '(none)'}")


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in a module's input or output (LSTMs return ``(out, (h, c))``)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for item in obj:
            t = first_tensor(item)
            if t is not None:
                return t
    elif isinstance(obj, dict):  # includes transformers' ModelOutput
        for item in obj.values():
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def as_rows(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Flatten a tensor into [rows, width] and return the leading shape of one forward.

    [B, D] -> B rows; [B, T, D] (sequences, tokens) -> B*T rows of D; [D] -> 1 row;
    4-D and up (conv maps) -> B rows of everything else flattened.
    """
    if t.dim() == 0:
        return t.reshape(1, 1), [1]
    if t.dim() == 1:
        return t.reshape(1, -1), [1]
    if t.dim() <= 3:
        lead = list(t.shape[:-1])
        return t.reshape(-1, t.shape[-1]), lead
    return t.reshape(t.shape[0], -1), [t.shape[0]]


def tensor_hook(module: torch.nn.Module, site: str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Any:
    """A removable hook calling ``fn`` on the module's first input (site 'in') or the first tensor
    of its output ('out'); a tensor ``fn`` returns replaces it, None leaves it as it was."""
    if site == "in":

        def pre(m: torch.nn.Module, args: tuple) -> tuple | None:
            new = fn(first_tensor(args))
            return None if new is None else (new, *args[1:])

        return module.register_forward_pre_hook(pre)

    def post(m: torch.nn.Module, args: tuple, out: Any) -> Any:
        new = fn(first_tensor(out))
        if new is None:
            return None
        return new if isinstance(out, torch.Tensor) else (new, *out[1:])

    return module.register_forward_hook(post)
