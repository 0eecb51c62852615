"""Router kernel vs naive.route (selection by biased score, weights by unbiased score)."""
import pytest
import torch

from kimi_local.kernels import naive
from kimi_local.kernels.router import route


@pytest.mark.parametrize("T,E,k,biased", [(1, 256, 8, False), (5, 37, 3, False), (4, 16, 4, True), (3, 8, 1, False)])
def test_route_matches_reference(T, E, k, biased):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(T * E + k)
    x = torch.randn(T, 24, generator=g)
    w = torch.randn(E, 24, generator=g)
    bias = 0.3 * torch.randn(E, generator=g)
    ids_ref, w_ref = naive.route(x, w, bias, k, 2.446, biased_weights=biased)
    logits = (x @ w.t()).to(dev)
    ids_out = torch.full((T, k), -1, dtype=torch.int32, device=dev)
    w_out = torch.full((T, k), float("nan"), device=dev)
    ids, wts = route(logits, bias.to(dev), k, 2.446, biased_weights=biased, ids_out=ids_out, w_out=w_out)
    # same set of experts per token, same weight per expert (order may differ on ties only)
    for t in range(T):
        ref = dict(zip(ids_ref[t].tolist(), w_ref[t].tolist()))
        got = dict(zip(ids[t].cpu().tolist(), wts[t].cpu().tolist()))
        assert set(got) == set(ref)
        for e in ref:
            assert got[e] == pytest.approx(ref[e], rel=1e-5, abs=1e-6)
