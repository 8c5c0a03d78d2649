"""Token names for language-model taps, taken from each forward's ``input_ids``.

:meth:`Attachment.track_tokens` puts :class:`TokenTracker`'s pre-hook on the model. A forward
whose sequence starts at position 0 (a teacher-forced prompt, or the prompt pass of
``generate()``) is a new sequence; a forward that continues a cached one (``cache_position`` or
the cache's length > 0: a generation step) is sent with the last ``context`` tokens it continues,
so the explainer and panel can show a generated token in its text.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["TokenTracker", "sequence_start", "token_rows"]

log = logging.getLogger(__name__)


def token_rows(tokens: Any, context: Any, start: int, *, max_chars: int) -> tuple[list[list[str]], int, int]:
    """The rows of a ``tok`` frame from one prompt or a batch of equal-length prompts, each after
    its ``context`` tokens: (rows, context length, tokens per prompt). Bad input raises ValueError."""
    batch = [list(tokens)] if tokens and isinstance(tokens[0], str) else [list(r) for r in tokens]
    if not batch or not batch[0] or len({len(r) for r in batch}) != 1:
        raise ValueError("tokens() needs one non-empty prompt or a batch of prompts of equal length (pad them)")
    before = [[] for _ in batch] if not context else [list(context)] if isinstance(context[0], str) else [list(r) for r in context]
    if len(before) != len(batch) or len({len(r) for r in before}) != 1:
        raise ValueError(f"context needs one list of equal length per prompt ({len(batch)})")
    if start < 0:
        raise ValueError("start must be >= 0")
    rows = [[str(x)[:max_chars] for x in c + r] for c, r in zip(before, batch, strict=True)]
    return rows, len(before[0]), len(batch[0])


def sequence_start(kwargs: dict[str, Any]) -> int:
    """The position of a forward's first token in its sequence (0 without a cache)."""
    pos = kwargs.get("cache_position")
    if isinstance(pos, torch.Tensor) and pos.numel():
        return int(pos.reshape(-1)[0])
    cache = kwargs.get("past_key_values")
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # the legacy tuple of (key, value) per layer, [batch, heads, seq, dim]
        return int(cache[0][0].shape[-2]) if len(cache) else 0
    except (TypeError, IndexError, AttributeError):
        return 0


class TokenTracker:
    """Names the tokens of every forward of a causal LM (see the module docstring)."""

    def __init__(self, attachment: Any, tokenizer: Any, *, context: int = 32) -> None:
        if not hasattr(tokenizer, "convert_ids_to_tokens"):
            raise TypeError("track_tokens() needs a tokenizer with convert_ids_to_tokens (a HuggingFace tokenizer)")
        self.attachment = attachment
        self.tokenizer = tokenizer
        self.context = max(0, int(context))
        self.history: list[list[str]] = []  # per sequence of the batch: its last `context` tokens
        self.next_start: int | None = None  # where a forward continuing the last one would start

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        a = self.attachment
        if a.paused:
            return
        try:
            kwargs = kwargs or {}
            ids = kwargs.get("input_ids")
            if ids is None and args and isinstance(args[0], torch.Tensor):
                ids = args[0]
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
                # inputs_embeds only, or an odd call: still a step of its own, so its rows never
                # share (step, index) with the forward before; it just has no token names
                self.history, self.next_start = [], None
                a._new_forward()
                return
            start = sequence_start(kwargs)
            rows = [self.tokenizer.convert_ids_to_tokens(r) for r in ids.tolist()]
            # the context is the previous forward's only if this one continues exactly where it
            # ended (not after forwards missed while no monitor listened, nor another sequence)
            go_on = start > 0 and start == self.next_start and len(self.history) == len(rows) and self.context > 0
            before = [h[-self.context :] for h in self.history] if go_on else None
            if before and len({len(h) for h in before}) != 1:
                before = None
            self.next_start = None  # until this forward is named
            a.tokens(rows, context=before or None, start=start)
            self.history = [((h if go_on else []) + r)[-self.context :] for h, r in zip(self.history if go_on else [[]] * len(rows), rows, strict=True)]
            self.next_start = start + ids.shape[1]
        except Exception:  # naming tokens must never break the model's forward
            a._failed("tokens")
