"""TransformerLens hook names on HuggingFace models: the names SAELens SAEs are trained on.

An SAE's ``hook_name`` (``blocks.8.hook_resid_pre``) is a TransformerLens hook point of a
``HookedTransformer``. :data:`FAMILIES` says, per HuggingFace model family, which module and site
of the HuggingFace model carries the same value, row for row: ``blocks.8.hook_resid_pre`` of a
GPT-2 is the input of ``transformer.h.8``. :func:`agent_side.taps.resolve_tap` (and so
``attach()``) translates such a name when the model has no module of that name, and the tap keeps
the TransformerLens name: it streams as ``blocks.8.hook_resid_pre``, so the SAE's ``hook_name`` is
the run's tap and ``interlatent import PATH --source blocks.8.hook_resid_pre`` encodes it.

Every entry of ``hooks`` was checked against ``HookedTransformer.run_with_cache`` on a model with
the same (random) weights, loaded with TransformerLens' own weight converter and no weight
processing (``fold_ln``, ``center_writing_weights``, ``center_unembed`` and
``fold_value_biases`` off): ``tests/agent/test_hook_names.py``. The values are equal in eval mode
(dropout off; TransformerLens has no dropout). A hook whose value is no module's input or output
(or is one only for some calls) is in ``refused`` with the reason, and naming it is an error that
lists the supported ones; it is never approximated.

Nothing here imports torch or transformers: a family is recognised by the class name of its
transformer blocks, wherever the model puts them (``transformer.h.0`` of a ``GPT2LMHeadModel``,
``h.0`` of a ``GPT2Model``, ``base_model.model.transformer.h.0`` of a wrapped one).
"""

from __future__ import annotations

import difflib
import re
from typing import Any

__all__ = ["FAMILIES", "HookNameError", "is_hook_name", "family_of", "translate", "supported"]

# ``{L}`` is the block's index; module paths are relative to the model that holds the blocks
# (``transformer.`` in a GPT2LMHeadModel, nothing in a GPT2Model).
FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": {
        "title": "GPT-2",
        "layers": ("GPT2Block",),  # the class of one transformer block
        "blocks": "h",  # the ModuleList that holds them
        "hooks": {  # hook name -> (module, site)
            "hook_embed": ("wte", "out"),
            "blocks.{L}.hook_resid_pre": ("h.{L}", "in"),
            "blocks.{L}.attn.hook_z": ("h.{L}.attn.c_proj", "in"),  # heads merged: [.., n_heads * d_head]
            "blocks.{L}.hook_attn_out": ("h.{L}.attn", "out"),  # the first tensor of (output, weights)
            "blocks.{L}.hook_resid_mid": ("h.{L}.ln_2", "in"),
            "blocks.{L}.hook_mlp_in": ("h.{L}.ln_2", "in"),  # TransformerLens has it with use_hook_mlp_in
            "blocks.{L}.mlp.hook_pre": ("h.{L}.mlp.act", "in"),
            "blocks.{L}.mlp.hook_post": ("h.{L}.mlp.act", "out"),
            "blocks.{L}.hook_mlp_out": ("h.{L}.mlp", "out"),
            "blocks.{L}.hook_resid_post": ("h.{L}", "out"),
            "unembed.hook_in": ("ln_f", "out"),
        },
        "refused": {
            "hook_pos_embed": "GPT-2 embeds the positions once per forward ([1, pos, d_model]), not once per sequence of the batch",
            "blocks.{L}.ln1.hook_normalized": "TransformerLens' value is before the LayerNorm's weight and bias; ln_1's output is after",
            "blocks.{L}.ln2.hook_normalized": "TransformerLens' value is before the LayerNorm's weight and bias; ln_2's output is after",
            "ln_final.hook_normalized": "TransformerLens' value is before the LayerNorm's weight and bias; ln_f's output is after",
            "blocks.{L}.ln1.hook_scale": "computed inside the LayerNorm, no module's input or output",
            "blocks.{L}.ln2.hook_scale": "computed inside the LayerNorm, no module's input or output",
            "ln_final.hook_scale": "computed inside the LayerNorm, no module's input or output",
            "blocks.{L}.attn.hook_q": "GPT-2 computes q, k and v as one output of c_attn ([.., 3 * d_model])",
            "blocks.{L}.attn.hook_k": "GPT-2 computes q, k and v as one output of c_attn ([.., 3 * d_model])",
            "blocks.{L}.attn.hook_v": "GPT-2 computes q, k and v as one output of c_attn ([.., 3 * d_model])",
            "blocks.{L}.attn.hook_attn_scores": "computed inside the attention function, per head and key position",
            "blocks.{L}.attn.hook_pattern": "computed inside the attention function, per head and key position",
            "blocks.{L}.attn.hook_result": "GPT-2 never forms each head's output: c_proj sums the heads",
            "blocks.{L}.hook_attn_in": "TransformerLens copies the residual once per head; GPT-2 has no such value",
            "blocks.{L}.hook_q_input": "TransformerLens copies the residual once per head; GPT-2 has no such value",
            "blocks.{L}.hook_k_input": "TransformerLens copies the residual once per head; GPT-2 has no such value",
            "blocks.{L}.hook_v_input": "TransformerLens copies the residual once per head; GPT-2 has no such value",
            "unembed.hook_out": "HuggingFace computes logits only for the positions it keeps (generate() keeps the last one), "
            "so the rows would not line up with the tokens",
        },
    },
    "llama": {
        "title": "Llama, Mistral, Qwen2",
        "layers": ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"),
        "blocks": "layers",
        "hooks": {
            "hook_embed": ("embed_tokens", "out"),
            "blocks.{L}.hook_resid_pre": ("layers.{L}", "in"),
            "blocks.{L}.attn.hook_z": ("layers.{L}.self_attn.o_proj", "in"),  # heads merged: [.., n_heads * d_head]
            "blocks.{L}.hook_attn_out": ("layers.{L}.self_attn", "out"),
            "blocks.{L}.hook_resid_mid": ("layers.{L}.post_attention_layernorm", "in"),
            "blocks.{L}.hook_mlp_in": ("layers.{L}.post_attention_layernorm", "in"),
            "blocks.{L}.mlp.hook_pre": ("layers.{L}.mlp.act_fn", "in"),  # the gate projection
            "blocks.{L}.mlp.hook_pre_linear": ("layers.{L}.mlp.up_proj", "out"),
            "blocks.{L}.mlp.hook_post": ("layers.{L}.mlp.down_proj", "in"),  # act(gate) * up
            "blocks.{L}.hook_mlp_out": ("layers.{L}.mlp", "out"),
            "blocks.{L}.hook_resid_post": ("layers.{L}", "out"),
            "unembed.hook_in": ("norm", "out"),
        },
        "refused": {
            "blocks.{L}.ln1.hook_normalized": "TransformerLens' value is before the RMSNorm's weight; input_layernorm's output is after",
            "blocks.{L}.ln2.hook_normalized": "TransformerLens' value is before the RMSNorm's weight; "
            "post_attention_layernorm's output is after",
            "ln_final.hook_normalized": "TransformerLens' value is before the RMSNorm's weight; norm's output is after",
            "blocks.{L}.ln1.hook_scale": "computed inside the RMSNorm, no module's input or output",
            "blocks.{L}.ln2.hook_scale": "computed inside the RMSNorm, no module's input or output",
            "ln_final.hook_scale": "computed inside the RMSNorm, no module's input or output",
            "blocks.{L}.attn.hook_q": "q_proj's output is before the rotary embedding and shaped [.., n_heads * d_head]",
            "blocks.{L}.attn.hook_k": "k_proj's output is before the rotary embedding and shaped [.., n_kv_heads * d_head]",
            "blocks.{L}.attn.hook_v": "TransformerLens repeats v per query head; v_proj has n_kv_heads",
            "blocks.{L}.attn.hook_rot_q": "the rotary embedding is applied inside the attention module",
            "blocks.{L}.attn.hook_rot_k": "the rotary embedding is applied inside the attention module",
            "blocks.{L}.attn.hook_attn_scores": "computed inside the attention function, per head and key position",
            "blocks.{L}.attn.hook_pattern": "computed inside the attention function, per head and key position",
            "blocks.{L}.attn.hook_result": "the model never forms each head's output: o_proj sums the heads",
            "blocks.{L}.hook_attn_in": "TransformerLens copies the residual once per head; the model has no such value",
            "blocks.{L}.hook_q_input": "TransformerLens copies the residual once per head; the model has no such value",
            "blocks.{L}.hook_k_input": "TransformerLens copies the residual once per head; the model has no such value",
            "blocks.{L}.hook_v_input": "TransformerLens copies the residual once per head; the model has no such value",
            "unembed.hook_out": "HuggingFace computes logits only for the positions it keeps (generate() keeps the last one), "
            "so the rows would not line up with the tokens",
        },
    },
}

_HOOK = re.compile(r"(?:^|\.)hook_\w+$")


class HookNameError(ValueError):
    """A TransformerLens hook name this model cannot give row for row (the message says why)."""


def is_hook_name(name: str) -> bool:
    """Whether ``name`` is spelled like a TransformerLens hook point (its last part ``hook_...``)."""
    return bool(_HOOK.search(name))


def _pattern(key: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(key).replace(re.escape("{L}"), r"(\d+)") + "$")


_PATTERNS = {fam: [(_pattern(k), k) for k in (*f["hooks"], *f["refused"])] for fam, f in FAMILIES.items()}


def family_of(root: Any) -> tuple[str, str, int] | None:
    """(family, the path the family's module paths are under, number of blocks) of a torch module,
    or None when none of its modules is a block of a family in :data:`FAMILIES`."""
    named = list(root.named_modules())
    for fam, f in FAMILIES.items():
        first = next((n for n, m in named if type(m).__name__ in f["layers"] and n.split(".")[-1] == "0"), None)
        if first is None:
            continue
        tail = f"{f['blocks']}.0"
        if first != tail and not first.endswith("." + tail):
            continue
        base = first[: -len(tail)]
        count = sum(
            1 for n, m in named if type(m).__name__ in f["layers"] and re.fullmatch(re.escape(base + f["blocks"]) + r"\.\d+", n)
        )
        return fam, base, count
    return None


def supported(fam: str) -> list[str]:
    """The hook names of a family that map, with ``{L}`` for the block."""
    return list(FAMILIES[fam]["hooks"])


def translate(root: Any, name: str) -> tuple[str, str]:
    """(module path, site) of ``root`` that carries the TransformerLens hook ``name``; a
    :class:`HookNameError` saying why not for a model of no known family, a refused hook, a hook
    the family does not have, or a block the model does not have."""
    found = family_of(root)
    model = type(root).__name__
    if found is None:
        known = "; ".join(f"{f['title']} ({', '.join(f['layers'])})" for f in FAMILIES.values())
        raise HookNameError(
            f"{name!r} is a TransformerLens hook name, and {model} is none of the models whose hook names are mapped "
            f"to modules ({known}); attach to a HookedTransformer, or name the module that carries it"
        )
    fam, base, count = found
    f = FAMILIES[fam]
    listing = f"supported on {model} (blocks 0-{count - 1}): {', '.join(supported(fam))}"
    for pat, key in _PATTERNS[fam]:
        m = pat.match(name)
        if m is None:
            continue
        if key in f["refused"]:
            raise HookNameError(f"hook {name!r} cannot be tapped on {model} ({f['refused'][key]}); {listing}")
        module, site = f["hooks"][key]
        if m.groups():
            layer = int(m.group(1))
            if layer >= count:
                raise HookNameError(f"hook {name!r}: {model} has blocks 0-{count - 1}; {listing}")
            module = module.format(L=layer)
        return base + module, site
    names = [k.format(L=i) for k in f["hooks"] for i in (range(count) if "{L}" in k else [0])]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.8)
    guess = f" (did you mean {', '.join(close)}?)" if close else ""
    raise HookNameError(f"{name!r} is no TransformerLens hook of a {f['title']} model{guess}; {listing}")
