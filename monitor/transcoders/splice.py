"""Return recovered: how much of the policy's behaviour a transcoder keeps.

The transcoder is spliced into the policy (the target tap's value is replaced by the
reconstruction from the source tap) and the policy is run for N episodes; so is the clean
policy, and the policy with the target zero-ablated. The figure is
``(R_spliced - R_ablated) / (R_clean - R_ablated)``: 1 when the transcoder loses nothing the
policy uses, 0 when it is no better than deleting the layer.

An agent is ``(module, make_env, act)``: the torch module the taps live in, a function making
a fresh gymnasium env, and ``act(obs) -> action`` (:mod:`monitor.experiments.agents` loads one
from the command line's ``--agent``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from agent_side.taps import parse_tap, resolve, tensor_hook
from monitor.transcoders.model import Transcoder

__all__ = ["Agent", "return_recovered", "spliced", "mean_return"]

Agent = tuple[torch.nn.Module, Callable[[], Any], Callable[[Any], Any]]


@contextlib.contextmanager
def spliced(root: torch.nn.Module, model: Transcoder | None, source: str, target: str) -> Iterator[None]:
    """Within the block, ``target`` carries the transcoder's reconstruction from ``source``
    (``model`` None: zeros instead, the ablation)."""
    src, tgt = parse_tap(source), parse_tap(target)
    src_mod, tgt_mod = resolve(root, src), resolve(root, tgt)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    if model is None:
        handles.append(tensor_hook(tgt_mod, tgt.site, torch.zeros_like))
    else:
        if (src.module, src.site) != (tgt.module, tgt.site):

            def remember(t: torch.Tensor) -> torch.Tensor:
                seen["x"] = t
                return t

            handles.append(tensor_hook(src_mod, src.site, remember))

        def rebuild(t: torch.Tensor) -> torch.Tensor:
            x = seen.pop("x", t)
            shape = t.shape
            _, rec = model(x.reshape(-1, x.shape[-1]).float())  # the skip term and de-normalization included
            return rec.reshape(shape).to(t.dtype)

        handles.append(tensor_hook(tgt_mod, tgt.site, rebuild))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def mean_return(make_env: Callable[[], Any], act: Callable[[Any], Any], episodes: int, *, seed: int = 0) -> float:
    env = make_env()
    total = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, ret = False, 0.0
        while not done:
            obs, r, term, trunc, _ = env.step(act(obs))
            ret += float(r)
            done = term or trunc
        total.append(ret)
    env.close()
    return float(np.mean(total))


def return_recovered(
    agent: Agent, model: Transcoder, source: str, target: str, *, episodes: int = 10, seed: int = 0
) -> dict[str, Any]:
    """Mean return clean, spliced and ablated over the same episode seeds, and the fraction recovered."""
    root, make_env, act = agent
    clean = mean_return(make_env, act, episodes, seed=seed)
    with spliced(root, model, source, target):
        spl = mean_return(make_env, act, episodes, seed=seed)
    with spliced(root, None, source, target):
        abl = mean_return(make_env, act, episodes, seed=seed)
    gap = clean - abl
    return {
        "episodes": episodes,
        "return_clean": clean,
        "return_spliced": spl,
        "return_ablated": abl,
        "return_recovered": (spl - abl) / gap if abs(gap) > 1e-9 else None,
    }
