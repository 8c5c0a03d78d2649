"""Language-model taps by TransformerLens hook names (an SAELens SAE's ``hook_name``).

The reference is TransformerLens itself: a ``HookedTransformer`` built by hand from the tiny
HuggingFace model's config, its weights converted by TransformerLens' own converter and loaded with
no processing (no LayerNorm folding, no centering), so ``run_with_cache`` holds the values the
HuggingFace model computes. Every mapped hook is attached by its name, streamed to a real monitor,
and compared row for row with ``cache[hook_name]``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import wait_until, word_tokenizer

import agent_side
from agent_side import hooknames
from agent_side.taps import TapError, parse_tap, resolve, resolve_tap
from monitor.store.records import Store

transformers = pytest.importorskip("transformers")
tl = pytest.importorskip("transformer_lens")

VOCAB, LAYERS, D, HEADS, CTX = 50, 2, 32, 4, 16
BATCH, LENGTH = 2, 7
ATOL = 1e-5


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere: LayerNorm weights off 1 and biases off 0, so a hook that differs
    from its module by an affine map (``hook_normalized``) or a bias cannot pass by chance."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _hooked(cfg_kw: dict, convert, hf: torch.nn.Module) -> torch.nn.Module:
    cfg = tl.HookedTransformerConfig(
        n_layers=LAYERS, d_model=D, d_head=D // HEADS, n_heads=HEADS, n_ctx=CTX, d_vocab=VOCAB, use_hook_mlp_in=True, **cfg_kw
    )
    model = tl.HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert(hf, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model.eval()


def gpt2_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    torch.manual_seed(0)
    hc = transformers.GPT2Config(n_layer=LAYERS, n_embd=D, n_head=HEADS, vocab_size=VOCAB, n_positions=CTX)
    hf = _perturbed(transformers.GPT2LMHeadModel(hc))
    kw = dict(d_mlp=4 * D, act_fn=hc.activation_function, eps=hc.layer_norm_epsilon, normalization_type="LN")
    return hf, _hooked({**kw, "original_architecture": "GPT2LMHeadModel"}, convert_gpt2_weights, hf)


def llama_pair(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformer_lens.pretrained.weight_conversions import (
        convert_llama_weights,
        convert_mistral_weights,
        convert_qwen2_weights,
    )

    config, model, arch, convert = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, "LlamaForCausalLM", convert_llama_weights),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, "MistralForCausalLM", convert_mistral_weights),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, "Qwen2ForCausalLM", convert_qwen2_weights),
    }[kind]
    torch.manual_seed(0)
    hc = config(
        num_hidden_layers=LAYERS,
        hidden_size=D,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2,  # grouped-query attention: hook_z still has a row of n_heads * d_head
        intermediate_size=2 * D,
        vocab_size=VOCAB,
        max_position_embeddings=CTX,
        rms_norm_eps=1e-5,
        **({} if kind == "llama" else {"sliding_window": None}),
    )
    hf = _perturbed(model(hc))
    theta = (getattr(hc, "rope_parameters", None) or {}).get("rope_theta", getattr(hc, "rope_theta", 10000.0))
    kw = dict(
        d_mlp=2 * D,
        n_key_value_heads=HEADS // 2,
        act_fn="silu",
        eps=1e-5,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=D // HEADS,
        rotary_base=theta,
        final_rms=True,
        gated_mlp=True,
        original_architecture=arch,
    )
    return hf, _hooked(kw, convert, hf)


def _every_hook(fam: str) -> list[str]:
    return [k.format(L=i) for k in hooknames.supported(fam) for i in (range(LAYERS) if "{L}" in k else [0])]


def _stream(model: torch.nn.Module, taps: list[str], ids: torch.Tensor, store: Store, endpoint: str, run: str) -> dict:
    """Attach by these names, run one forward, and read back what the monitor kept per tap."""
    with agent_side.attach(model, taps, run=run, endpoint=endpoint) as tap:
        assert tap.wait_for_monitor(10)
        with torch.no_grad():
            model(ids)
        tap.flush()
        rows = ids.numel()
        wait_until(
            lambda: all((got := store.recent(run, t)) is not None and len(got[0]) == rows for t in taps),
            what="every tap's rows",
        )
        assert tap.counters()["drops"] == 0
    return {t: store.recent(run, t) for t in taps}


def _compare(got: dict, cache, ids: torch.Tensor) -> dict[str, float]:
    """Each tap's streamed rows against TransformerLens' cache, batch-major (row b * T + t)."""
    worst = {}
    for name, (data, pos) in got.items():
        ref = cache[name].detach()
        ref = ref.reshape(ref.shape[0] * ref.shape[1], -1).numpy()  # hook_z: [B, T, head, d_head] -> heads merged
        assert data.shape == ref.shape, name
        assert pos[:, 0].tolist() == [0] * ids.numel() and pos[:, 1].tolist() == list(range(ids.numel())), name
        worst[name] = float(np.abs(data - ref).max())
        np.testing.assert_allclose(data, ref, atol=ATOL, rtol=0, err_msg=name)
    return worst


@pytest.mark.timeout(120)
def test_every_mapped_gpt2_hook_streams_what_transformer_lens_caches(store: Store, live_monitor) -> None:
    hf, ref = gpt2_pair()
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, cache = ref.run_with_cache(ids)
        torch.testing.assert_close(logits, hf(ids).logits, atol=ATOL, rtol=0)  # the twin is the same model
    taps = _every_hook("gpt2")
    assert len(taps) == 2 + 9 * LAYERS
    got = _stream(hf, taps, ids, store, live_monitor.endpoint, "gpt2")
    assert set(store.taps("gpt2")) == set(taps)  # streamed under the TransformerLens names
    worst = _compare(got, cache, ids)
    print("\nmax |HF - TransformerLens| per hook (GPT-2):", {k: f"{v:.1e}" for k, v in worst.items()})


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_llama_family_hooks_stream_what_transformer_lens_caches(kind: str, store: Store, live_monitor) -> None:
    hf, ref = llama_pair(kind)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, cache = ref.run_with_cache(ids)
        torch.testing.assert_close(logits, hf(ids).logits, atol=ATOL, rtol=0)
    taps = _every_hook("llama")
    worst = _compare(_stream(hf, taps, ids, store, live_monitor.endpoint, kind), cache, ids)
    print(f"\nmax |HF - TransformerLens| per hook ({kind}):", {k: f"{v:.1e}" for k, v in worst.items()})


def test_names_resolve_to_the_module_and_site_and_keep_the_hook_name() -> None:
    hf, _ = gpt2_pair()
    for name, module, site in [
        ("blocks.1.hook_resid_pre", "transformer.h.1", "in"),
        ("blocks.0.hook_resid_post:out", "transformer.h.0", "out"),  # a hook's :in and :out are the same value
        ("blocks.0.attn.hook_z", "transformer.h.0.attn.c_proj", "in"),
        ("blocks.1.mlp.hook_post", "transformer.h.1.mlp.act", "out"),
        ("hook_embed", "transformer.wte", "out"),
    ]:
        spec, mod = resolve_tap(hf, parse_tap(name))
        assert (spec.module, spec.site, str(spec)) == (module, site, name.split(":")[0])
        assert mod is dict(hf.named_modules())[module]
    spec, _ = resolve_tap(hf.transformer, parse_tap("blocks.1.hook_resid_post"))  # a GPT2Model: no "transformer."
    assert (spec.module, spec.site) == ("h.1", "out")
    spec, _ = resolve_tap(hf, parse_tap("transformer.h.0:in"))  # module names are as before
    assert str(spec) == "transformer.h.0:in" and spec.name is None
    with pytest.raises(ValueError, match="duplicate"):  # two spellings of one hook
        agent_side.attach(hf, ["blocks.0.hook_resid_post", "blocks.0.hook_resid_post:out"], run="x")


def test_refused_hooks_say_why_and_list_the_supported_ones() -> None:
    hf, _ = gpt2_pair()
    for name, why in [
        ("hook_pos_embed", "once per forward"),
        ("blocks.0.ln1.hook_normalized", "before the LayerNorm's weight"),
        ("ln_final.hook_scale", "inside the LayerNorm"),
        ("blocks.1.attn.hook_q", "one output of c_attn"),
        ("blocks.0.attn.hook_pattern", "inside the attention function"),
        ("blocks.0.attn.hook_result", "sums the heads"),
        ("unembed.hook_out", "positions it keeps"),
        ("blocks.2.hook_resid_post", "blocks 0-1"),
    ]:
        with pytest.raises(TapError) as e:
            agent_side.attach(hf, [name], run="x")
        msg = str(e.value)
        assert repr(name) in msg and why in msg, msg
        assert "supported on GPT2LMHeadModel (blocks 0-1): hook_embed, blocks.{L}.hook_resid_pre" in msg
    with pytest.raises(TapError, match=r"did you mean blocks\.0\.hook_resid_post\?"):
        agent_side.attach(hf, ["blocks.0.hook_resid_pots"], run="x")
    with pytest.raises(TapError, match="none of the models whose hook names are mapped"):
        agent_side.attach(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["blocks.0.hook_resid_post"], run="x")
    # resolve() (steering, probes) never moves a tap to another site: it names the module to use
    with pytest.raises(TapError, match=r"name it transformer\.h\.0:in"):
        resolve(hf, parse_tap("blocks.0.hook_resid_pre"))


def test_the_refused_near_misses_really_differ() -> None:
    """What a refused hook would have mapped to is not TransformerLens' value: ln_1's output is
    after the affine map, and GPT-2's position embedding has one row set per forward, not per row."""
    hf, ref = gpt2_pair()
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(2))
    seen = {}
    hs = [
        hf.transformer.h[0].ln_1.register_forward_hook(lambda m, a, out: seen.__setitem__("ln_1", out)),
        hf.transformer.wpe.register_forward_hook(lambda m, a, out: seen.__setitem__("wpe", out)),
    ]
    with torch.no_grad():
        hf(ids)
        _, cache = ref.run_with_cache(ids)
    for h in hs:
        h.remove()
    assert (seen["ln_1"] - cache["blocks.0.ln1.hook_normalized"]).abs().max() > 0.01
    assert seen["wpe"].shape[0] == 1 and cache["hook_pos_embed"].shape[0] == BATCH


@pytest.mark.timeout(120)
def test_a_hooked_transformer_streams_its_hook_points_by_name(store: Store, live_monitor) -> None:
    """Attached to a HookedTransformer, a hook point is its own module: a bare name, ``:in`` or
    ``:out`` stream under the hook name, a per-head hook (hook_z) one row per token."""
    _, model = gpt2_pair()
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    asked = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "hook_embed:out", "blocks.0.mlp.hook_post:in"]
    names = [a.split(":")[0] for a in asked]
    words = [f"w{i}" for i in range(VOCAB)]
    with agent_side.attach(model, asked, run="hooked", endpoint=live_monitor.endpoint) as tap:
        assert tap.wait_for_monitor(10)
        tap.track_tokens(word_tokenizer(words))  # HookedTransformer.forward(input, ...) takes the ids as `input`
        with torch.no_grad():
            model(ids)
        tap.flush()
        wait_until(
            lambda: (
                all((g := store.recent("hooked", n)) is not None and len(g[0]) == ids.numel() for n in names)
                and store.token_steps("hooked")
            ),
            60,
            what="the hook points' rows and the forward's tokens",
        )
    (step,) = store.token_steps("hooked")
    assert store.tokens("hooked", [step])[step]["rows"] == [[words[int(i)] for i in row] for row in ids]
    assert set(store.taps("hooked")) == set(names)
    assert store.taps("hooked")["blocks.1.attn.hook_z"]["width"] == D  # n_heads * d_head
    worst = _compare({n: store.recent("hooked", n) for n in names}, cache, ids)
    assert max(worst.values()) < 1e-6  # the same tensors, through float32
    with pytest.raises(TapError, match="no row per token"):
        agent_side.attach(model, ["blocks.0.attn.hook_pattern"], run="x")
    with pytest.raises(TapError, match="close matches: blocks.0.hook_resid_post"):  # a misspelt hook point
        agent_side.attach(model, ["blocks.0.hook_resid_pots"], run="x")
