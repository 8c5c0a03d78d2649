"""The language-model page's latents per token: a tiny GPT-2 generates, tapped by an SAE's
``hook_name``; the monitor encodes the tap online with that SAE (an SAELens-format directory
registered as ``interlatent import`` registers it); an explanation is stored the way the explainer
stores one. The page lists each token of the latest sequence with its most active latents and
their explanations, and the values are the SAE's own encoding of the model's activations."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import ROOT, LiveMonitor, wait_until, word_tokenizer
from safetensors.torch import save_file

import agent_side
from monitor.store.jobs import store_explanation
from monitor.store.records import Store

transformers = pytest.importorskip("transformers")
pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = str(ROOT / "monitor" / "panel" / "app.py")
WORDS = [f"w{i}" for i in range(30)]
HOOK = "blocks.1.hook_resid_post"
D, D_SAE, TOP = 32, 16, 3
PROMPT, NEW = [3, 4, 5, 6, 7], 4
LABEL = "fires at the end of the text"


def _saelens_dir(path: Path) -> dict[str, torch.Tensor]:
    """An SAE in SAELens' layout, trained (say) on GPT-2's blocks.1.hook_resid_post."""
    gen = torch.Generator().manual_seed(5)
    w = {
        "W_enc": torch.randn(D, D_SAE, generator=gen),
        "b_enc": -0.1 * torch.ones(D_SAE),  # most latents stay off: 1 to 6 of 16 are on per token
        "W_dec": torch.randn(D_SAE, D, generator=gen),
        "b_dec": torch.zeros(D),
    }
    path.mkdir()
    save_file(w, str(path / "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": D, "d_sae": D_SAE, "hook_name": HOOK, "apply_b_dec_to_input": False}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return w


@pytest.fixture
def lm(store: Store, tmp_path: Path) -> dict:
    """A run "lm": one teacher-forced prompt (step 0), then generate() from another prompt."""
    from monitor.transcoders.artifacts import load_artifact
    from monitor.transcoders.training import artifact_info

    w = _saelens_dir(tmp_path / "sae")
    sae, cfg = load_artifact(tmp_path / "sae")
    store.register_transcoder(artifact_info("sae", tmp_path / "sae", sae, run="lm", source=cfg["hook_name"], target=HOOK, q=None))
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_head=4, n_embd=D, vocab_size=len(WORDS), n_positions=32)
    ).eval()
    tok = word_tokenizer(WORDS)
    mon = LiveMonitor(store)
    try:
        with agent_side.attach(model, [cfg["hook_name"]], run="lm", endpoint=mon.endpoint) as tap:
            assert tap.wait_for_monitor(10)
            tap.track_tokens(tok, context=8)
            with torch.no_grad():
                model(torch.tensor([[1, 2, 3]]))
                out = model.generate(
                    torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
                )
            tap.flush()
            rows = 3 + len(PROMPT) + NEW - 1  # the last token is sampled, never fed back
            wait_until(
                lambda: (got := store.recent("lm", "latents:sae")) is not None and len(got[0]) == rows,
                60,
                what="the SAE's latents of every forward",
            )
    finally:
        mon.close()
    seq = out[0, :-1]  # what the sequence's forwards fed the model, one token each
    acts = {}
    h = model.transformer.h[1].register_forward_hook(lambda m, a, o: acts.__setitem__("x", o))
    with torch.no_grad():  # the reference: the whole sequence teacher-forced, encoded by hand
        model(seq[None])
    h.remove()
    z = torch.relu(acts["x"][0] @ w["W_enc"] + w["b_enc"]).numpy()
    return {"tokens": tok.convert_ids_to_tokens(seq.tolist()), "z": z}


def test_token_latents_are_the_sae_encoding_of_each_token(store: Store, lm: dict) -> None:
    from monitor.panel.data import latent_taps_for, token_latents

    z, tokens = lm["z"], lm["tokens"]
    assert latent_taps_for(store, "lm", HOOK) == ["latents:sae"] == latent_taps_for(store, "lm", "latents:sae")
    on = (z > 0).sum(axis=1)
    assert on.min() < TOP < on.max() and z[-1].max() > 0  # some tokens have fewer active latents than shown
    last = int(np.argmax(z[-1]))
    store_explanation(store.r, {"run": "lm", "tap": "latents:sae", "latent": last, "label": LABEL, "text": "", "backend": "test"})
    table = token_latents(store, "lm", "latents:sae", top=TOP)
    assert table is not None
    # the latest sequence: generate()'s prompt pass (step 1) and its cached steps, not step 0's prompt
    assert table["token"].tolist() == tokens and table["position"].tolist() == list(range(len(tokens)))
    assert table["step"].tolist() == [1] * len(PROMPT) + list(range(2, 2 + NEW - 1))
    assert table["generated"].tolist() == [False] * len(PROMPT) + [True] * (NEW - 1)
    for t in range(len(tokens)):
        want = [j for j in np.argsort(-z[t], kind="stable")[:TOP] if z[t, j] > 0]
        got = [int(table.loc[t, f"latent {r + 1}"]) for r in range(TOP) if not table.isna().loc[t, f"latent {r + 1}"]]
        assert got == want, t
        vals = [table.loc[t, f"value {r + 1}"] for r in range(len(want))]
        np.testing.assert_allclose(vals, z[t, want], atol=1e-4)  # cached generation steps vs teacher forcing
        labels = [table.loc[t, f"explanation {r + 1}"] for r in range(TOP)]
        assert labels == [LABEL if r < len(want) and want[r] == last else "" for r in range(TOP)]
    assert table.loc[len(tokens) - 1, "explanation 1"] == LABEL
    earlier = token_latents(store, "lm", "latents:sae", top=TOP, step=0)  # any sequence still in the recent rows
    assert earlier["token"].tolist() == ["w1", "w2", "w3"] and not earlier["generated"].any()


@pytest.fixture
def _own_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLATENT_REDIS_URL", "")  # restored at teardown


def unescape(text: str) -> str:
    """Markdown as the browser shows it: the panel writes the punctuation of names as character
    references, with an invisible word joiner after each ``:``, ``.`` and ``@``."""
    return html.unescape(text).replace("\u2060", "")


def _page(redis_url: str, **params: str) -> AppTest:
    os.environ["INTERLATENT_REDIS_URL"] = redis_url
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update({"page": "Language models", "run": "lm", **params})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_the_language_page_lists_each_tokens_top_latents_with_explanations(
    store: Store, lm: dict, redis_url: str, _own_env: None
) -> None:
    z, tokens = lm["z"], lm["tokens"]
    last = int(np.argmax(z[-1]))
    store_explanation(store.r, {"run": "lm", "tap": "latents:sae", "latent": last, "label": LABEL, "text": "", "backend": "test"})
    for tap in ("latents:sae", HOOK):  # the latent tap itself, or the tap the SAE reads
        at = _page(redis_url, tap=tap)
        (df,) = [d.value for d in at.dataframe if "latent 1" in d.value.columns]
        assert df["token"].tolist() == tokens
        assert [None if pd.isna(x) else int(x) for x in df["latent 1"]] == [int(np.argmax(r)) if r.max() > 0 else None for r in z]
        assert df["explanation 1"].iloc[-1] == LABEL
        assert any(f"Top {TOP} latents of latents:sae" in unescape(s.value) for s in at.subheader)
    at = _page(redis_url, tap=HOOK)
    at.run()  # a refresh renders again
    assert not at.exception


def test_a_tap_no_transcoder_reads_says_how_to_get_latents(store: Store, live_monitor, redis_url: str, _own_env: None) -> None:
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(WORDS))).eval()
    with agent_side.attach(model, ["blocks.0.hook_resid_post"], run="lm", endpoint=live_monitor.endpoint) as tap:
        assert tap.wait_for_monitor(10)
        tap.track_tokens(word_tokenizer(WORDS))
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
        tap.flush()
        wait_until(lambda: store.recent("lm", "blocks.0.hook_resid_post") is not None, 60, what="rows")
    at = _page(redis_url, tap="blocks.0.hook_resid_post")
    assert any(
        "No transcoder encodes blocks.0.hook_resid_post" in unescape(i.value) and "interlatent import" in i.value for i in at.info
    )
