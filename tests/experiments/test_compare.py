"""Matching two transcoders' latents finds a planted permutation, and what each side has alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monitor.experiments.compare import _assign, compare_report, match_latents
from monitor.transcoders.model import Transcoder

D_IN, D_SAE, D_OUT = 16, 12, 32


def _a() -> Transcoder:
    torch.manual_seed(0)
    return Transcoder(D_IN, D_SAE, D_OUT)


def _permuted(a: Transcoder, perm: np.ndarray, *, noise: float = 0.01, seed: int = 1) -> Transcoder:
    """B's latent j is A's latent perm[j], with a little noise on every weight."""
    g = torch.Generator().manual_seed(seed)
    b = Transcoder(a.d_in, len(perm), a.d_out)
    p = torch.as_tensor(perm)
    with torch.no_grad():
        b.W_enc.copy_(a.W_enc[:, p] + noise * torch.randn(a.d_in, len(perm), generator=g))
        b.b_enc.copy_(a.b_enc[p])
        b.W_dec.copy_(a.W_dec[p] + noise * torch.randn(len(perm), a.d_out, generator=g))
        b.b_dec.copy_(a.b_dec)
    return b


def _orthogonal_to(a: Transcoder, seed: int) -> torch.Tensor:
    """A unit direction orthogonal to every decoder row of ``a``: cosine 0 with all its latents."""
    v = torch.randn(a.d_out, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(a.W_dec.detach().double().T)
    v = v - q @ (q.T @ v)
    return (v / v.norm()).float()


PERM = np.random.default_rng(0).permutation(D_SAE)


@pytest.mark.parametrize("method", ["hungarian", "greedy"])
def test_decoder_matching_recovers_a_permutation(method: str) -> None:
    a = _a()
    res = match_latents(a, _permuted(a, PERM), method=method)
    assert res["method"] == method and res["by"] == "decoder"
    assert sorted((p["b"], p["a"]) for p in res["shared"]) == [(j, int(PERM[j])) for j in range(D_SAE)]
    assert all(p["cosine"] > 0.99 for p in res["shared"])
    assert res["unique_a"] == [] and res["unique_b"] == []
    json.dumps(res)  # plain data, ready to store as JSON


def test_a_replaced_latent_is_unique_on_both_sides_and_an_extra_one_on_its_side() -> None:
    a = _a()
    b = _permuted(a, PERM)
    with torch.no_grad():
        b.W_dec[5] = _orthogonal_to(a, seed=3)
    res = match_latents(a, b)
    assert [u["latent"] for u in res["unique_a"]] == [int(PERM[5])]
    assert [u["latent"] for u in res["unique_b"]] == [5]
    assert abs(res["unique_b"][0]["score"]) < 0.5 and len(res["shared"]) == D_SAE - 1

    extra = Transcoder(D_IN, D_SAE + 1, D_OUT)
    c = _permuted(a, PERM)
    with torch.no_grad():
        extra.W_enc[:, :D_SAE] = c.W_enc
        extra.b_enc[:D_SAE] = c.b_enc
        extra.W_dec[:D_SAE] = c.W_dec
        extra.W_dec[D_SAE] = _orthogonal_to(a, seed=4)
        extra.b_dec.copy_(c.b_dec)
    res = match_latents(a, extra)
    assert [u["latent"] for u in res["unique_b"]] == [D_SAE] and res["unique_a"] == []
    assert res["n_b"] == D_SAE + 1 and len(res["shared"]) == D_SAE


def test_activation_correlation_of_matched_latents_is_near_one() -> None:
    a = _a()
    b = _permuted(a, PERM)
    X = np.random.default_rng(2).standard_normal((500, D_IN)).astype(np.float32)
    res = match_latents(a, b, Xa=X, Xb=X)
    assert len(res["shared"]) == D_SAE and all(p["act_corr"] > 0.98 for p in res["shared"])
    assert res["dead_a"] == [] and res["dead_b"] == []
    # on states where nothing relates the two, the matched pairs' activations do not correlate
    X2 = np.random.default_rng(3).standard_normal((500, D_IN)).astype(np.float32)
    unrelated = match_latents(a, b, Xa=X, Xb=X2)
    assert max(abs(p["act_corr"]) for p in unrelated["pairs"]) < 0.3


def test_activation_matching_works_across_unrelated_output_bases() -> None:
    a = _a()
    b = _permuted(a, PERM)
    other = Transcoder(D_IN, D_SAE, 20)  # a different output width: B's decoder lives elsewhere
    with torch.no_grad():
        other.W_enc.copy_(b.W_enc)
        other.b_enc.copy_(b.b_enc)
    X = np.random.default_rng(2).standard_normal((500, D_IN)).astype(np.float32)
    res = match_latents(a, other, Xa=X, Xb=X, by="activation", threshold=0.9)
    assert sorted((p["b"], p["a"]) for p in res["shared"]) == [(j, int(PERM[j])) for j in range(D_SAE)]
    assert all(p["cosine"] is None for p in res["pairs"])
    with pytest.raises(ValueError, match="by='activation'"):
        match_latents(a, other)
    with pytest.raises(ValueError, match="both Xa and Xb"):
        match_latents(a, b, Xa=X)


def test_hungarian_beats_greedy_where_the_best_pair_first_is_a_trap() -> None:
    score = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert sorted(_assign(score, "hungarian")) == [(0, 1), (1, 0)]  # total 1.65
    assert sorted(_assign(score, "greedy")) == [(0, 0), (1, 1)]  # total 1.0
    rect = np.array([[0.1, 0.9, 0.2]])
    assert _assign(rect, "hungarian") == _assign(rect, "greedy") == [(0, 1)]


def test_report_lists_shared_and_unique_latents_with_their_explanations() -> None:
    a = _a()
    b = _permuted(a, PERM)
    with torch.no_grad():
        b.W_dec[5] = _orthogonal_to(a, seed=3)
    res = json.loads(json.dumps(match_latents(a, b)))
    ex_a = {int(PERM[0]): "pole falling | left", int(PERM[5]): "cart near the edge"}
    ex_b = {"0": "pole falling left", "5": "late in the episode"}  # str keys, as read back from JSON
    md = compare_report(res, explanations_a=ex_a, explanations_b=ex_b, name_a="run1", name_b="run2")
    assert "## Shared (11)" in md and "## Unique to run1 (1)" in md and "## Unique to run2 (1)" in md
    assert f"| {PERM[0]} | 0 | " in md and "pole falling \\| left" in md and "| pole falling left |" in md
    unique_a = md.split("## Unique to run1")[1].split("## Unique to run2")[0]
    assert f"| {PERM[5]} |" in unique_a and "cart near the edge" in unique_a
    assert "late in the episode" in md.split("## Unique to run2")[1]
    assert "cart near the edge" not in md.split("## Unique to run1")[0]  # not listed as shared


def test_exported_names() -> None:
    import monitor.experiments.compare

    assert monitor.experiments.compare.__all__ == ["match_latents", "compare_report"]
