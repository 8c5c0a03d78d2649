"""Where a forward starts in its sequence, read from what a causal LM call carries, whatever the
installed transformers calls it (tests/agent/test_transformers_range.py runs this module against the
oldest transformers the ``hf`` extra allows too)."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import wait_until

import agent_side
from agent_side.lm import _named, sequence_start
from monitor.store.records import Store

transformers = pytest.importorskip("transformers")


def _gpt2(vocab: int = 30) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=vocab, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _record_starts(model: torch.nn.Module) -> tuple[list[int | None], list[int], object]:
    """A pre-hook that notes each forward's derived start and its input width."""
    starts: list[int | None] = []
    widths: list[int] = []
    sig = inspect.signature(model.forward)

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = _named(sig, args, kwargs)
        widths.append(int(inputs["input_ids"].shape[1]))
        starts.append(sequence_start(inputs, widths[-1]))

    return starts, widths, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("left_pad", [0, 2])
def test_generate_steps_are_placed_with_and_without_left_padding(left_pad: int) -> None:
    """generate() on a batch whose second prompt is left-padded: the prompt pass starts at 0 and
    each cached step at the padded length plus the tokens generated before it."""
    model = _gpt2()
    ids = torch.tensor([[3, 4, 5, 6, 7], [0] * left_pad + [8, 9, 10, 11, 12][left_pad:]])
    mask = torch.ones_like(ids)
    mask[1, :left_pad] = 0
    starts, widths, handle = _record_starts(model)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    handle.remove()
    assert widths == [5, 1, 1, 1]
    assert starts == [0, 5, 6, 7]


def test_a_cache_passed_by_position_or_keyword_is_read() -> None:
    """model(ids, cache) with the cache as a positional argument, and as past_key_values=."""
    model = _gpt2()
    starts, _, handle = _record_starts(model)
    with torch.no_grad():
        first = model(torch.tensor([[1, 2, 3]]), use_cache=True)  # no cache, no positions: starts at 0
        model(torch.tensor([[4]]), first.past_key_values)
        second = model(torch.tensor([[1, 2, 3, 4, 5]]), use_cache=True)  # cache objects grow in place: another one
        model(torch.tensor([[6]]), past_key_values=second.past_key_values)
        model(torch.tensor([[5, 6]]), position_ids=torch.tensor([[9, 10]]))
    handle.remove()
    assert starts == [0, 3, 0, 5, 9]


def test_the_trust_order_and_what_cannot_be_placed() -> None:
    ids = torch.zeros(2, 3, dtype=torch.long)
    assert (
        sequence_start(
            {"input_ids": ids, "cache_position": torch.tensor([7, 8, 9]), "position_ids": torch.tensor([[0, 1, 2]] * 2)}, 3
        )
        == 7
    )
    assert (
        sequence_start(
            {"input_ids": ids, "position_ids": torch.tensor([[4, 5, 6], [1, 1, 0]]), "attention_mask": torch.ones(2, 3)}, 3
        )
        == 4
    )  # positions over the mask's length
    assert sequence_start({"input_ids": ids, "attention_mask": torch.ones(2, 10)}, 3) == 7
    assert sequence_start({"input_ids": ids}, 3) == 0
    assert sequence_start({"input_ids": ids, "use_cache": True, "return_dict": True}, 3) == 0
    assert sequence_start({"input_ids": ids, "position_ids": torch.tensor([0.5, 1.5, 2.5])}, 3) == 0  # float: not positions
    hidden = (torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))  # an LSTM's (h, c): a state, but no length
    assert sequence_start({"input_ids": ids, "state": hidden}, 3) is None
    assert sequence_start({"input_ids": ids, "state": hidden, "attention_mask": torch.ones(2, 5)}, 3) == 2

    class Broken:
        def get_seq_length(self) -> int:
            raise RuntimeError("no")

    assert sequence_start({"input_ids": ids, "cache": Broken()}, 3) is None


class _RecurrentLM(torch.nn.Module):
    """A word-level LSTM language model whose forward continues a state it is handed."""

    def __init__(self, vocab: int = 12, width: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.lstm = torch.nn.LSTM(width, width, batch_first=True)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, state: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        h, state = self.lstm(self.embed(input_ids), state)
        return self.head(h), state


@pytest.mark.timeout(120)
def test_a_forward_that_cannot_be_placed_is_its_own_step_and_counted(store: Store, live_monitor) -> None:
    """An LSTM's continued state has no length: such a forward gets no token names (never start
    0), is a step of its own, and is counted in tap.counters()."""
    from helpers import word_tokenizer

    words = [f"w{i}" for i in range(12)]
    model = _RecurrentLM(len(words))
    with agent_side.attach(model, ["head:out"], run="rnn", endpoint=live_monitor.endpoint) as tap:
        assert tap.wait_for_monitor(10)
        tap.track_tokens(word_tokenizer(words))
        with torch.no_grad():
            _, state = model(torch.tensor([[1, 2, 3]]))  # step 0: a new sequence
            _, state = model(torch.tensor([[4]]), state)  # step 1: where does it start? unknown
            model(torch.tensor([[5]]), state=state)  # step 2: the same, by keyword
            model(torch.tensor([[6, 7]]))  # step 3: a new sequence again
        tap.flush()
        assert tap.counters()["tokens_unplaced"] == 2
        wait_until(
            lambda: store.recent("rnn", "head:out") is not None and len(store.recent("rnn", "head:out")[1]) == 3 + 1 + 1 + 2,
            what="four forwards",
        )
    assert store.token_steps("rnn") == [0, 3]
    assert store.tokens("rnn", [3])[3] == {"rows": [["w6", "w7"]], "context": 0, "start": 0}
    _, pos = store.recent("rnn", "head:out")
    assert sorted(pos[:, 0].tolist()) == [0, 0, 0, 1, 2, 3, 3]  # each unplaced forward is a step apart
