"""Language-model taps: the agent names each forward's tokens, the monitor keeps them, and the
explainer shows (and scores on) the token each activation fired on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import wait_until, word_tokenizer

import agent_side
from agent_side.wire import WireError, decode, encode_tok
from explainer import Worker, explanations, file_job
from explainer.context import build_context, render_prompt, token_context
from monitor.store.records import Store

WORDS = [f"w{i}" for i in range(40)] + [" cat", " dog", " the", " a", ".", ",", " sat", " ran", " on", " mat"]


def _b(parts: list) -> list[bytes]:
    return [bytes(p) for p in parts]


def test_tok_frames_round_trip_and_bad_ones_are_refused() -> None:
    f = decode(_b(encode_tok("lm", "p", 3, 0, 7, [["a", "b", "c"], ["d", "e", "f"]])))
    assert (f.kind, f.step, f.tokens, f.rows) == ("tok", 7, [["a", "b", "c"], ["d", "e", "f"]], 6)
    good = _b(encode_tok("lm", "p", 3, 0, 7, [["a", "b"]]))
    import msgpack

    for body, reason in [
        (msgpack.packb([["a"]]), "bad_header"),  # shape says 1x2
        (msgpack.packb([["a", 3]]), "bad_header"),  # not a string
        (msgpack.packb([["a", "x" * 300]]), "bad_header"),  # a token over the name limit
        (b"\xc1", "bad_msgpack"),
    ]:
        with pytest.raises(WireError) as e:
            decode([good[0], body])
        assert e.value.reason == reason
    with pytest.raises(WireError) as e:
        decode(good[:1])
    assert e.value.reason == "bad_frame"


def test_generation_steps_carry_their_context() -> None:
    f = decode(_b(encode_tok("lm", "p", 3, 0, 8, [["a", "b", "c"], ["d", "e", "f"]], context=2, start=9)))
    assert (f.context, f.start, f.rows) == (2, 9, 2)  # one new token per sequence, after two of context
    import msgpack

    hdr, body = _b(encode_tok("lm", "p", 3, 0, 8, [["a", "b", "c"]], context=1, start=1))
    for context, start in [(3, 0), (-1, 0), (0, -2), (1.5, 0), ("1", 0), (True, 0)]:  # must leave a token; ints only
        h = msgpack.unpackb(hdr) | {"context": context, "start": start}
        with pytest.raises(WireError) as e:
            decode([msgpack.packb(h), body])
        assert e.value.reason == "bad_header"
    assert token_context({"rows": [["x", " y", " z"]], "context": 2, "start": 5}, 0) == "x y⟦ z⟧"


def test_token_context_marks_the_token() -> None:
    rows = {"rows": [["A", " b", " c"], [" x", " y", " z"]], "context": 0, "start": 0}
    assert token_context(rows, 1) == "A⟦ b⟧ c"
    assert token_context(rows, 5, before=1) == " y⟦ z⟧"


@pytest.mark.timeout(120)
def test_gpt2_tokens_reach_the_prompt_and_the_rules_backend_names_the_token(store: Store, live_monitor) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(WORDS), n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    cat = WORDS.index(" cat")
    with torch.no_grad():  # plant: embedding channel 0 is high on " cat" only
        model.transformer.wte.weight[:, 0] = -1.0
        model.transformer.wte.weight[cat, 0] = 5.0
    rng = np.random.default_rng(0)
    n, batch, length = 80, 2, 10
    sent: list[list[list[str]]] = []
    with agent_side.attach(model, ["transformer.wte:out"], run="lm", endpoint=live_monitor.endpoint) as tap:
        assert tap.wait_for_monitor(10)
        with torch.no_grad():
            for _ in range(n):
                ids = rng.integers(0, len(WORDS), (batch, length))
                toks = [[WORDS[i] for i in row] for row in ids]
                tap.tokens(toks)
                model(torch.as_tensor(ids))
                sent.append(toks)
        tap.flush()
        wait_until(
            lambda: store.analytics("lm", "transformer.wte:out") is not None and len(store.token_steps("lm")) == n,
            what="tokens and analytics",
        )

    assert store.token_steps("lm") == list(range(n))
    assert store.tokens("lm", [0, n - 1]) == {
        0: {"rows": sent[0], "context": 0, "start": 0},
        n - 1: {"rows": sent[-1], "context": 0, "start": 0},
    }
    ctx = build_context(store, "lm", "transformer.wte:out", 0)
    assert ctx is not None and ctx.tokens and ctx.metrics == ["token_pos"]
    for e in ctx.top:  # every top example is a " cat", shown in its own sentence
        b, t = divmod(e["index"], length)
        assert e["token"] == " cat" == sent[e["step"]][b][t]
        assert "⟦ cat⟧" in e["context"] and e["context"] in render_prompt(ctx)
    assert len(ctx.heldout_tokens) == len(ctx.heldout_values) > 200

    assert file_job(store.r, "lm", "transformer.wte:out", 0, reason="test")
    assert Worker(store, consumer="w").run(burst=True) == 1
    (e,) = explanations(store.r, "lm")
    assert "' cat'" in e["label"] and e["conditions"] == [{"tokens": [" cat"]}]
    s = e["score"]
    assert s["balanced_accuracy"] > 0.95 and s["balanced_accuracy"] > s["shuffled"] + 0.3
    assert s["simulation"] > s["simulation_shuffled"] + 0.3


def test_tokens_need_equal_lengths(store: Store, live_monitor) -> None:
    with agent_side.attach(torch.nn.Linear(2, 2), [":out"], run="x", endpoint=live_monitor.endpoint) as tap:
        with pytest.raises(ValueError, match="equal length"):
            tap.tokens([["a", "b"], ["c"]])
        with pytest.raises(ValueError):
            tap.tokens([])


@pytest.mark.timeout(120)
def test_track_tokens_names_prompts_and_generate_steps(store: Store, live_monitor) -> None:
    """tap.track_tokens(tokenizer): no tap.tokens() calls; a teacher-forced forward and a cached
    generate() are both named from input_ids, and a generated token is shown in its text."""
    transformers = pytest.importorskip("transformers")
    from monitor.panel.data import token_trace

    words = [f"w{i}" for i in range(30)]
    tok = word_tokenizer(words)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(words), n_positions=64)
    ).eval()
    prompt = torch.tensor([[3, 4, 5, 6, 7, 8]])
    new = 5
    with agent_side.attach(model, ["transformer.h.0:out"], run="gen", endpoint=live_monitor.endpoint) as tap:
        assert tap.wait_for_monitor(10)
        tap.track_tokens(tok, context=4)
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))  # a teacher-forced forward: step 0
            out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        tap.flush()
        assert tap.counters()["drops"] == 0
        wait_until(
            lambda: (
                len(store.token_steps("gen")) == 1 + new
                and store.recent("gen", "transformer.h.0:out") is not None
                and len(store.recent("gen", "transformer.h.0:out")[1]) == 3 + 6 + new - 1
            ),
            what="generation tokens",
        )
    seq = tok.convert_ids_to_tokens(out[0].tolist())  # prompt + generated
    got = store.tokens("gen", range(1 + new))
    assert got[0] == {"rows": [["w1", "w2", "w3"]], "context": 0, "start": 0}
    assert got[1] == {"rows": [seq[:6]], "context": 0, "start": 0}  # generate's prompt pass: a new sequence
    for k in range(1, new):  # each cached step: one new token after the last 4 it continues
        p = 6 + k - 1
        assert got[1 + k] == {"rows": [seq[p - 4 : p + 1]], "context": 4, "start": p}
    assert token_context(got[new], 0, before=3) == "".join(seq[6 + new - 5 : 6 + new - 2]) + f"⟦{seq[6 + new - 2]}⟧"
    tr = token_trace(store, "gen", "transformer.h.0:out", 0, new)  # the panel's trace: the whole sequence
    assert tr["position"].tolist() == list(range(6 + new - 1)) and tr["token"].tolist() == seq[: 6 + new - 1]
    assert tr["position"].tolist() == sorted(tr["position"].tolist())


@pytest.mark.timeout(180)
def test_the_generate_example_streams_every_sequence(store: Store, live_monitor) -> None:
    """examples/lm_generate.py in its own process: each prompt's pass and each cached generation
    step arrive named, and the monitor's tokens spell out the texts the script printed."""
    import json
    import subprocess

    from helpers import ROOT, spawn

    from monitor.panel.data import cross_prompt

    proc = spawn(
        [
            str(ROOT / "examples" / "lm_generate.py"),
            "--endpoint",
            live_monitor.endpoint,
            "--run",
            "ex",
            "--prompts",
            "3",
            "--new-tokens",
            "4",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out
    lines = [json.loads(x) for x in out.splitlines()]
    texts, done = [x["tokens"] for x in lines[:-1]], lines[-1]
    assert len(texts) == 3 and done["done"] and done["drops"] == 0
    forwards = 3 * 4  # per prompt: its pass, then three cached steps (the fourth token is sampled, never fed back)
    wait_until(lambda: len(store.token_steps("ex")) == forwards, what="every forward's tokens")
    got = store.tokens("ex", range(forwards))
    for i, text in enumerate(texts):
        first = got[4 * i]
        assert first["start"] == 0 and first["rows"][0] == text[: len(first["rows"][0])]
        n = len(first["rows"][0])
        for k in range(1, 4):  # a cached step: the token at position n + k - 1, after its context
            step = got[4 * i + k]
            assert step["start"] == n + k - 1 and step["rows"][0][-1] == text[n + k - 1]
    tap = "transformer.h.1:out"
    wait_until(
        lambda: cross_prompt(store, "ex", tap, 0) is not None and cross_prompt(store, "ex", tap, 0)["prompt"].nunique() == 3,
        what="three sequences in the panel's data",
    )
    cross = cross_prompt(store, "ex", tap, 0)
    for i, (_, seq) in enumerate(cross.groupby("prompt", sort=True)):
        assert seq["token"].tolist() == texts[i][: len(seq)] and len(seq) == len(texts[i]) - 1


@pytest.mark.timeout(120)
def test_the_tracker_never_shares_a_step_or_borrows_context(store: Store, live_monitor) -> None:
    """A forward it cannot name (inputs_embeds) is still a step of its own; a cached forward that
    does not continue the last one exactly (missed forwards, another cache) gets no context; the
    panel's sequences follow positions, not just neighbouring steps."""
    transformers = pytest.importorskip("transformers")
    from monitor.panel.data import token_trace

    words = [f"w{i}" for i in range(12)]
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(words), n_positions=32)
    torch.manual_seed(0)
    model, twin = transformers.GPT2LMHeadModel(cfg).eval(), transformers.GPT2LMHeadModel(cfg).eval()
    tap_name = "transformer.h.0:out"
    with agent_side.attach(model, [tap_name], run="edge", endpoint=live_monitor.endpoint) as tap:
        assert tap.wait_for_monitor(10)
        tap.track_tokens(word_tokenizer(words), context=4)
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))  # step 0
            model(inputs_embeds=torch.zeros(1, 2, 16))  # step 1: no names
            cache = model(torch.tensor([[4, 5]]), use_cache=True).past_key_values  # step 2: a new prompt
            model(torch.tensor([[6]]), past_key_values=cache)  # step 3: continues step 2 at position 2
            other = twin(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), use_cache=True).past_key_values  # not watched
            model(torch.tensor([[9]]), past_key_values=other)  # step 4: position 8, not where step 3 ended
        tap.flush()
        wait_until(
            lambda: (
                len(store.token_steps("edge")) == 4
                and store.recent("edge", tap_name) is not None
                and len(store.recent("edge", tap_name)[1]) == 3 + 2 + 2 + 1 + 1
            ),
            what="five forwards",
        )
    assert store.token_steps("edge") == [0, 2, 3, 4]
    _, pos = store.recent("edge", tap_name)
    assert sorted(set(pos[:, 0].tolist())) == [0, 1, 2, 3, 4] and (pos[:, 0] == 1).sum() == 2  # step 1's rows, apart
    got = store.tokens("edge", [3, 4])
    assert got[3] == {"rows": [["w4", "w5", "w6"]], "context": 2, "start": 2}
    assert got[4] == {"rows": [["w9"]], "context": 0, "start": 8}
    assert token_trace(store, "edge", tap_name, 0, 3)["token"].tolist() == ["w4", "w5", "w6"]
    assert token_trace(store, "edge", tap_name, 0, 4)["position"].tolist() == [8]  # not joined to steps 2-3
