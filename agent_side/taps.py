"""Taps: a module name plus a site, ``in`` or ``out`` (``mlp_extractor.policy_net.0:in``).

A language model's tap may also be a TransformerLens hook name (``blocks.3.hook_resid_post``, an
SAELens SAE's ``hook_name``): on a ``HookedTransformer`` it is the hook point module itself, on a
HuggingFace model of a family :mod:`agent_side.hooknames` maps it is the module and site carrying
the same value. Either way :func:`resolve_tap` names the tap by the hook name alone (a hook point's
input is its output, so ``:in`` and ``:out`` name the same tap), and its rows are one per token.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from agent_side import hooknames

__all__ = ["TapSpec", "TapError", "parse_tap", "resolve", "resolve_tap", "first_tensor", "as_rows", "tensor_hook"]

SITES = ("in", "out")


class TapError(ValueError):
    """A tap that does not name a module of the model, or a malformed tap string."""


@dataclass(frozen=True)
class TapSpec:
    """``module`` and ``site`` say where the hook goes; ``name``, when set, is what the tap streams
    as (a TransformerLens hook name); ``per_position`` says the tensor is [batch, position, ...]
    with one row per position (a hook point's per-head [batch, pos, head, d_head] values)."""

    module: str
    site: str
    name: str | None = None
    per_position: bool = False

    def __str__(self) -> str:
        return self.name or f"{self.module}:{self.site}"


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


def _missing(root: torch.nn.Module, name: str, modules: dict[str, torch.nn.Module]) -> TapError:
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if not close:
        close = [n for n in names if name.split(".")[-1] in n][:5] or names[:5]
    return TapError(f"no module named {name!r} in {type(root).__name__}; close matches: {', '.join(close) or '(none)'}")


def _has_hook_points(modules: dict[str, torch.nn.Module]) -> bool:
    """Whether the model is a TransformerLens one (its hook points are its modules)."""
    return any(type(m).__name__ == "HookPoint" for m in modules.values())


def resolve(root: torch.nn.Module, spec: TapSpec) -> torch.nn.Module:
    """The submodule ``spec.module`` names, or a :class:`TapError` listing close matches.

    A TransformerLens hook name that is not a module of ``root`` is refused here with the module
    and site that carry it (only :func:`resolve_tap` may move a tap to another site)."""
    modules = dict(root.named_modules())
    if spec.module in modules:
        return modules[spec.module]
    if hooknames.is_hook_name(spec.module) and not _has_hook_points(modules):
        try:
            module, site = hooknames.translate(root, spec.module)
        except hooknames.HookNameError as e:
            raise TapError(str(e)) from None
        raise TapError(f"{spec.module!r} is a TransformerLens hook name; on {type(root).__name__} name it {module}:{site} here")
    raise _missing(root, spec.module, modules)


_NOT_PER_TOKEN = ("hook_attn_scores", "hook_pattern")  # [batch, head, query, key]: no row per token


def resolve_tap(root: torch.nn.Module, spec: TapSpec) -> tuple[TapSpec, torch.nn.Module]:
    """The tap as it will be hooked and named, and its module.

    A module of ``root`` is that module (a TransformerLens ``HookPoint`` is named by its hook name,
    one row per position); a TransformerLens hook name on a HuggingFace model of a family
    :data:`agent_side.hooknames.FAMILIES` maps is moved to the module and site carrying it and keeps
    the hook name. Anything else is a :class:`TapError` that says why and what would work."""
    modules = dict(root.named_modules())
    mod = modules.get(spec.module)
    if mod is not None:
        if type(mod).__name__ != "HookPoint":
            return spec, mod
        if spec.module.rsplit(".", 1)[-1] in _NOT_PER_TOKEN:
            raise TapError(
                f"hook {spec.module!r} holds [batch, head, query, key] attention values, no row per token; "
                "tap blocks.L.attn.hook_z or blocks.L.hook_attn_out instead"
            )
        return TapSpec(spec.module, "out", name=spec.module, per_position=True), mod
    if not hooknames.is_hook_name(spec.module) or _has_hook_points(modules):  # a misspelt hook of a HookedTransformer
        raise _missing(root, spec.module, modules)
    try:
        module, site = hooknames.translate(root, spec.module)
    except hooknames.HookNameError as e:
        raise TapError(str(e)) from None
    if module not in modules:  # a family's module this build of the model lacks
        raise _missing(root, module, modules)
    return TapSpec(module, site, name=spec.module), modules[module]


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


def as_rows(t: torch.Tensor, *, per_position: bool = False) -> tuple[torch.Tensor, list[int]]:
    """Flatten a tensor into [rows, width] and return the leading shape of one forward.

    [B, D] -> B rows; [B, T, D] (sequences, tokens) -> B*T rows of D; [D] -> 1 row;
    4-D and up (conv maps) -> B rows of everything else flattened, or, ``per_position``,
    B*T rows of everything after the position ([B, T, heads, d_head] -> rows of heads*d_head).
    """
    if per_position and t.dim() > 3:
        return t.reshape(t.shape[0] * t.shape[1], -1), list(t.shape[:2])
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
