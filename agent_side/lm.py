"""Token names for language-model taps, taken from each forward's ``input_ids``.

:meth:`Attachment.track_tokens` puts :class:`TokenTracker`'s pre-hook on the model. A forward
whose sequence starts at position 0 (a teacher-forced prompt, or the prompt pass of
``generate()``) is a new sequence; a forward that continues a cached one (a generation step) is
sent with the last ``context`` tokens it continues, so the explainer and panel can show a
generated token in its text. Where a forward starts is read from what every causal LM call
carries in some form, whatever transformers names it (see :func:`sequence_start`); a forward
that cannot be placed is a step of its own with no token names, counted as ``tokens_unplaced``
in ``tap.counters()``, never guessed to start at 0.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["TokenTracker", "sequence_start", "token_rows"]

log = logging.getLogger(__name__)

# inputs that are never a cache, whatever their names say
_NOT_CACHES = frozenset(
    {
        "input_ids",
        "inputs_embeds",
        "attention_mask",
        "position_ids",
        "cache_position",
        "token_type_ids",
        "head_mask",
        "labels",
        "use_cache",
        "logits_to_keep",
        "num_logits_to_keep",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
    }
)


def token_rows(tokens: Any, context: Any, start: int, *, max_chars: int) -> tuple[list[list[str]], int, int]:
    """The rows of a ``tok`` frame from one prompt or a batch of equal-length prompts, each after
    its ``context`` tokens: (rows, context length, tokens per prompt). Bad input raises ValueError."""
    batch = [list(tokens)] if tokens and isinstance(tokens[0], str) else [list(r) for r in tokens]
    if not batch or not batch[0] or len({len(r) for r in batch}) != 1:
        raise ValueError("tokens() needs one non-empty prompt or a batch of prompts of equal length (pad them)")
    before = (
        [[] for _ in batch] if not context else [list(context)] if isinstance(context[0], str) else [list(r) for r in context]
    )
    if len(before) != len(batch) or len({len(r) for r in before}) != 1:
        raise ValueError(f"context needs one list of equal length per prompt ({len(batch)})")
    if start < 0:
        raise ValueError("start must be >= 0")
    rows = [[str(x)[:max_chars] for x in c + r] for c, r in zip(before, batch, strict=True)]
    return rows, len(before[0]), len(batch[0])


def _named(sig: inspect.Signature | None, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A forward's inputs by parameter name, positional ones included (``model(ids, cache)``)."""
    if sig is not None and args:
        try:
            bound = sig.bind_partial(*args, **kwargs).arguments
        except TypeError:
            pass
        else:
            named: dict[str, Any] = {}
            for name, value in bound.items():
                kind = sig.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    named.update(value)
                elif kind is not inspect.Parameter.VAR_POSITIONAL:
                    named[name] = value
            return named
    return {"input_ids": args[0], **kwargs} if args else dict(kwargs)


def _read_cache(value: Any) -> int | None:
    """The number of cached positions in a ``Cache`` object or a legacy tuple of (key, value) per
    layer ([batch, heads, seq, dim]); None when ``value`` is neither."""
    if hasattr(value, "get_seq_length"):
        return int(value.get_seq_length())
    if isinstance(value, (tuple, list)):
        if not value:
            return 0
        first = value[0][0] if isinstance(value[0], (tuple, list)) and value[0] else None
        if isinstance(first, torch.Tensor) and first.dim() >= 2:
            return int(first.shape[-2])
    return None


def sequence_start(inputs: Mapping[str, Any], length: int) -> int | None:
    """The position of a forward's first token in its (padded) sequence, from its named inputs.

    In order of trust: ``cache_position`` (the columns this forward fills); ``position_ids`` (the
    last token's position in the least padded row, minus the tokens before it in this forward, so
    left padding does not move it); a cache object under any keyword (``past_key_values``,
    ``cache``, ...: its length); the attention mask (its length covers the cached positions too).
    A forward with none of these and no other input object starts its sequence (0). None when an
    input object that may be a state it continues (an unknown cache, an RNN's hidden state) cannot
    be read and nothing else places the forward.

    >>> sequence_start({"position_ids": torch.tensor([[4], [2]])}, 1)  # a generation step; row 2 is left-padded
    4
    """
    pos = inputs.get("cache_position")
    if isinstance(pos, torch.Tensor) and pos.dim() == 1 and pos.numel() == length and not pos.is_floating_point():
        return int(pos[0])
    pos = inputs.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.dim() in (1, 2) and pos.shape[-1] == length and not pos.is_floating_point():
        start = int(pos[..., -1].max()) - (length - 1)
        if start >= 0:
            return start
    unreadable = False
    for name, value in inputs.items():
        if value is None or name in _NOT_CACHES or isinstance(value, (bool, int, float, str, torch.Tensor)):
            continue
        try:
            n = _read_cache(value)
        except Exception:  # a cache object of a kind we do not know how to read
            n = None
        if n is not None:
            return n
        unreadable = True  # an object we cannot read may be a state this forward continues (an RNN's, say)
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] >= length:
        return int(mask.shape[-1]) - length
    return None if unreadable else 0


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
        self.unplaced = 0  # forwards whose start position could not be derived
        self._sigs: dict[int, inspect.Signature | None] = {}  # per module: how to name positional inputs

    def _signature(self, module: torch.nn.Module) -> inspect.Signature | None:
        key = id(module)
        if key not in self._sigs:
            try:
                self._sigs[key] = inspect.signature(module.forward)
            except (TypeError, ValueError):
                self._sigs[key] = None
        return self._sigs[key]

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        a = self.attachment
        if a.paused:
            return
        try:
            inputs = _named(self._signature(module), args, kwargs or {})
            ids = inputs.get("input_ids")
            if ids is None:  # a TransformerLens HookedTransformer's forward(input, ...) with token ids
                ids = inputs.get("input")
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
                # inputs_embeds only, or an odd call: still a step of its own, so its rows never
                # share (step, index) with the forward before; it just has no token names
                self.history, self.next_start = [], None
                a._new_forward()
                return
            start = sequence_start(inputs, int(ids.shape[1]))
            if start is None:  # a cache we cannot read: never pretend the forward starts a sequence
                self.unplaced += 1
                if self.unplaced == 1:
                    log.warning(
                        "interlatent cannot tell where a forward of %s starts (inputs: %s); such forwards get no "
                        "token names (counted as tokens_unplaced)",
                        type(module).__name__,
                        sorted(inputs),
                    )
                self.history, self.next_start = [], None
                a._new_forward()
                return
            rows = [self.tokenizer.convert_ids_to_tokens(r) for r in ids.tolist()]
            # the context is the previous forward's only if this one continues exactly where it
            # ended (not after forwards missed while no monitor listened, nor another sequence)
            go_on = start > 0 and start == self.next_start and len(self.history) == len(rows) and self.context > 0
            before = [h[-self.context :] for h in self.history] if go_on else None
            if before and len({len(h) for h in before}) != 1:
                before = None
            self.next_start = None  # until this forward is named
            a.tokens(rows, context=before or None, start=start)
            self.history = [
                ((h if go_on else []) + r)[-self.context :]
                for h, r in zip(self.history if go_on else [[]] * len(rows), rows, strict=True)
            ]
            self.next_start = start + ids.shape[1]
        except Exception:  # naming tokens must never break the model's forward
            a._failed("tokens")
