"""kernels/expert_cache.py (GPU-side expert cache decisions and miss copies) against the reference
kernels/naive.resolve_experts, step by step over routing traces: every table, slot, miss list, score and
statistic must agree; copies must leave every resident slot equal to its expert's host bytes."""
import copy

import pytest
import torch

from kimi_local.kernels import naive
from kimi_local.kernels.expert_cache import LayerTables, copy_misses, resolve
from kimi_local.offload import synthetic_trace

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _tables(S, E, k, policy):
    t = LayerTables(S, E, k, DEV, policy)
    t.score.copy_(torch.rand(E, generator=torch.Generator().manual_seed(S)))  # a prior, as after a profile
    return t


def _same(a, b, where):
    for name in ("expert_slot", "slot_expert", "flag", "guess", "stats", "clock"):
        assert torch.equal(getattr(a, name).cpu(), getattr(b, name).cpu()), (where, name)
    assert torch.allclose(a.score.cpu(), b.score.cpu(), rtol=1e-5, atol=1e-5), where
    assert torch.allclose(a.counts.cpu(), b.counts.cpu()), where
    # tables consistent with each other
    se, es = a.slot_expert.cpu(), a.expert_slot.cpu()
    for s, e in enumerate(se.tolist()):
        if e >= 0:
            assert es[e] == s, where
    assert int((es >= 0).sum()) == int((se >= 0).sum()), where


@pytest.mark.parametrize("policy", ["lfu", "lru"])
@pytest.mark.parametrize("S,E,k,zipf", [(5, 11, 3, 0.0), (9, 16, 4, 1.0), (13, 40, 8, 1.0), (8, 8, 8, 0.0)])
def test_resolve_matches_reference(S, E, k, zipf, policy):
    trace = synthetic_trace(40, E, k, zipf_s=zipf, seed=E)
    guesses = synthetic_trace(40, E, k, zipf_s=zipf, seed=E + 1)
    kern, ref = _tables(S, E, k, policy), None
    ref = copy.deepcopy(kern)
    for step in range(trace.shape[0]):
        ids = trace[step].to(torch.int32).to(DEV)
        kern.slots.fill_(-7)
        a = resolve(kern, ids).clone()
        b = naive.resolve_experts(ref, ids).clone()
        assert torch.equal(a.cpu(), b.cpu()), step
        assert torch.equal(kern.miss.cpu(), ref.miss.cpu()), step
        _same(kern, ref, step)
        assert (a >= 0).all() and torch.equal(kern.expert_slot[ids.long()].cpu(), a.cpu())  # all resident
        if step % 3 != 2:  # a prefetch of some other ids (not always: recall counts only guessed steps)
            g = guesses[step, : max(1, k - 1)].to(torch.int32).to(DEV)
            pa = resolve(kern, g, prefetch=True).clone()
            pb = naive.resolve_experts(ref, g, prefetch=True).clone()
            assert torch.equal(pa.cpu(), pb.cpu()) and torch.equal(kern.pf_miss.cpu(), ref.pf_miss.cpu()), step
            _same(kern, ref, ("prefetch", step))
    st = kern.stats.cpu()
    assert st[0] == trace.shape[0] and st[1] == trace.numel() and st[2] + st[3] == st[1]
    assert 0 < st[3] < st[1]  # some misses, some hits


def test_copy_misses_fills_slots():
    S, E = 4, 9
    g = torch.Generator().manual_seed(0)
    host = [torch.randint(0, 255, (E, 3, 20), dtype=torch.uint8, generator=g),  # 60 B: word copies
            torch.randint(0, 255, (E, 2, 7), dtype=torch.uint8, generator=g),  # 14 B: byte copies
            torch.randn(E, 5, 3, generator=g).to(torch.bfloat16)]  # dense expert rows
    if DEV == "cuda":
        host = [h.pin_memory() for h in host]
    pools = [torch.full((S, *h.shape[1:]), 0, dtype=h.dtype, device=DEV) for h in host]
    t = LayerTables(S, E, 3, DEV, "lru")
    for ids in ([1, 4, 7], [4, 8, 0], [2, 3, 5], [5, 2, 6]):
        resolve(t, torch.tensor(ids, dtype=torch.int32, device=DEV))
        copy_misses(t.miss, host, pools)
        for s, e in enumerate(t.slot_expert.tolist()):
            if e >= 0:
                for h, p in zip(host, pools):
                    assert torch.equal(p[s].cpu(), h[e]), (ids, s, e)
