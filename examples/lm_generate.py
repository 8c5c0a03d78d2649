"""Watch a HuggingFace causal LM while it generates: one attach, one track_tokens, then plain
``model.generate()``. The monitor pairs every token's activations with its position, keeps the
text, and the panel's "Language models" page traces a latent over each generated sequence.

With ``--model PATH`` a local model directory is loaded (nothing is downloaded); without it a tiny
random-weight GPT-2 and a word-level tokenizer are built here, so the script runs anywhere::

    .venv/bin/interlatent up &                        # Redis, the monitor, an explainer, the panel
    .venv/bin/python examples/lm_generate.py --prompts 20
    .venv/bin/python examples/lm_generate.py --model ~/models/gpt2 --taps transformer.h.5.mlp:out

Prints one JSON line per generated text and the attachment's counters at the end.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import agent_side

WORDS = ["[UNK]", "the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "rug", "and", "then", "slept", "ate", "."]


def tiny_model_and_tokenizer() -> tuple[torch.nn.Module, object]:
    """A 2-layer GPT-2 with random weights and a whitespace word-level tokenizer over ``WORDS``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]", eos_token=".")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(WORDS), n_positions=128))
    return model.eval(), fast


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--endpoint", default=None, help="the monitor's endpoint (default $INTERLATENT_ENDPOINT or tcp://127.0.0.1:5557)"
    )
    p.add_argument("--run", default="lm-generate")
    p.add_argument("--model", help="a local HuggingFace causal-LM directory (default: a tiny GPT-2 built here)")
    p.add_argument("--taps", default="transformer.h.0:out,transformer.h.1:out", help="comma-separated taps")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--wait-monitor-s", type=float, default=20.0)
    a = p.parse_args()

    torch.set_num_threads(1)
    if a.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tok = (
            AutoModelForCausalLM.from_pretrained(a.model, local_files_only=True).eval(),
            AutoTokenizer.from_pretrained(a.model, local_files_only=True),
        )
    else:
        model, tok = tiny_model_and_tokenizer()
    subjects, verbs, places = ["the cat", "a dog", "the dog", "a cat"], ["sat", "ran", "slept"], ["on the mat", "under a rug"]
    prompts = [f"{subjects[i % 4]} {verbs[i % 3]} {places[i % 2]} and then" for i in range(a.prompts)]

    with agent_side.attach(model, a.taps.split(","), run=a.run, endpoint=a.endpoint) as tap:
        if a.wait_monitor_s and not tap.wait_for_monitor(a.wait_monitor_s):
            sys.exit(f"no monitor at {tap.endpoint}: start one with `interlatent up`")
        tap.track_tokens(tok)
        with torch.no_grad():
            for text in prompts:
                ids = tok(text, return_tensors="pt").input_ids
                out = model.generate(
                    ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
                )
                print(json.dumps({"prompt": text, "tokens": tok.convert_ids_to_tokens(out[0].tolist())}), flush=True)
        tap.flush()
        counters = tap.counters()
    print(json.dumps({"done": True, **counters}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
