"""Fused MoE kernels (kernels/moe.py) vs the dense fp32 reference `naive.moe_ref`.

CPU: Triton interpreter, tiny pools (D = F = 256, a few slots). CUDA (-m cuda): D=2304, F=1024,
256 experts, top-8 + shared, decode (also graph-captured) and prefill.
"""
import os
import sys
from pathlib import Path

import pytest
import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_quant_matmul import _gpu_dense, check, oracle_dequant, random_blocks, rel_rmse  # noqa: E402

try:
    from kimi_local.kernels import moe, quant_matmul as qm
    from kimi_local.kernels.naive import dequantize_x8_ref, moe_ref
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import moe, quant_matmul as qm
    from kernels.naive import dequantize_x8_ref, moe_ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _fp_activations(monkeypatch):
    """Decode defaults to int8 activations (x8); the fp tests here pin the fp path, the x8 tests pass x8."""
    monkeypatch.setenv("KIMI_LOCAL_X8", "0")


def moe_ref_x8(x, slots, w, gate_w, up_w, down_w, shared=None):
    """moe_ref with the x8 path's roundings: x and each expert's act rounded by dequantize_x8_ref."""
    xq = dequantize_x8_ref(x)
    experts = [(gate_w[s].float(), up_w[s].float(), down_w[s].float(), wt) for s, wt in zip(slots.tolist(), w)]
    if shared is not None:
        experts.append((*(t.float() for t in shared), 1.0))
    out = torch.zeros_like(xq)
    for g, u, d, wt in experts:
        h = torch.nn.functional.silu(g @ xq) * (u @ xq)
        out += wt * (d @ dequantize_x8_ref(h))
    return out


def make_pool(qtype, S, rows, K, device="cpu", gen=None, scale=0.01, dense=True):
    """(packed pool uint8 [S, rows, prb], dense fp32 [S, rows, K] or None)."""
    if qtype == "BF16":
        w = (torch.randn(S, rows, K, generator=gen) * scale).bfloat16().to(device)
        return qm.repack(w, "BF16").view(S, rows, -1), w.float()
    raw = random_blocks(qtype, S * rows, K, device, gen, scale).view(S, rows, -1)
    dq = None
    if dense:
        if device == "cpu":
            dq = oracle_dequant(raw.reshape(S * rows, -1), qtype).view(S, rows, K)
        else:
            dq = torch.stack([_gpu_dense(raw[s], qtype) for s in range(S)])
    return qm.repack(raw, qtype), dq


def make_moe(qtypes, S, D, F, shared_qtypes=None, device="cpu", seed=0, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    qg, qu, qd = qtypes
    pools = [make_pool(qg, S, F, D, device, g, scale), make_pool(qu, S, F, D, device, g, scale),
             make_pool(qd, S, D, F, device, g, scale)]
    shared = None
    if shared_qtypes is not None:
        sg, su, sd = shared_qtypes
        shared = [make_pool(sg, 1, F, D, device, g, scale), make_pool(su, 1, F, D, device, g, scale),
                  make_pool(sd, 1, D, F, device, g, scale)]
        shared = ([p[0][0] for p in shared], [p[1][0] for p in shared])
    return [p[0] for p in pools], [p[1] for p in pools], shared


def _expect_word_path(monkeypatch, qtypes, shared_qtypes):
    """moe_decode must not fall back to its tile kernels when every type has the word path."""
    word = all(q in qm.WORD_QTYPES for q in qtypes + (shared_qtypes or ()))
    if word:
        def no_tile(*a, **k):
            raise AssertionError("moe_decode fell back to the tile kernels")

        monkeypatch.setattr(moe, "moe_decode_tile", no_tile)
    return word


@pytest.mark.parametrize("qtypes,shared_qtypes", [
    (("Q4_K", "Q4_K", "Q5_K"), ("Q8_0", "Q6_K", "Q8_0")),  # recipe Q4_K_M experts
    (("Q3_K", "Q3_K", "Q4_K"), None),
    # recipe Q2_K experts (a Q6_K shared expert would be ~1e5x larger with random blocks: the test could
    # not see the routed experts)
    (("Q2_K", "Q2_K", "Q3_K"), ("Q2_K", "Q3_K", "Q2_K")),
    (("Q2_K", "Q2_K", "Q3_K"), ("BF16", "BF16", "BF16")),  # BF16: tile fallback
])
def test_moe_decode(qtypes, shared_qtypes, monkeypatch):
    word = _expect_word_path(monkeypatch, qtypes, shared_qtypes)
    assert word == ("BF16" not in (shared_qtypes or ()))
    S, D, F, k = 5, 256, 256, 3
    (gp, up, dp), (gd, ud, dd), shared = make_moe(qtypes, S, D, F, shared_qtypes)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(D, generator=g)
    slots = torch.randperm(S, generator=g)[:k].to(torch.int32)
    w = torch.rand(k, generator=g)
    out = torch.full((D,), float("nan"))
    moe.moe_decode(x, slots, w, gp, up, dp, qtypes, out, shared=None if shared is None else shared[0],
                   shared_qtypes=shared_qtypes)
    ref = moe_ref(x, slots[None], w[None], gd, ud, dd, shared=None if shared is None else shared[1])
    check(out, ref, 1e-5)


def _decode_case(qtypes, shared_qtypes, D, F, seed, S=3, k=2):
    """Pools (packed, dense), shared expert, and one token's x, slots, routing weights."""
    pools, dense, shared = make_moe(qtypes, S, D, F, shared_qtypes, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(D, generator=g)
    slots = torch.randperm(S, generator=g)[:k].to(torch.int32)
    return pools, dense, shared, x, slots, torch.rand(k, generator=g)


@pytest.mark.parametrize("qtypes,shared_qtypes,D,kw", [
    (("Q4_K", "Q4_K", "Q6_K"), ("Q8_0", "Q8_0", "Q8_0"), 768, dict(BF=256, S1=2, BD=256, S2=2)),  # uneven D split
    (("Q6_K", "Q8_0", "Q3_K"), None, 512, dict(BF=256, S1=1, BD=256, S2=2, C=16)),
    (("Q4_K", "Q4_K", "Q5_K"), ("Q8_0", "Q8_0", "Q8_0"), 768, dict(BF=256, S1=2, BD=256, S2=2)),  # Q5_K down
    # Q2_K gate/up: D slices of 512 + 256 elements (8 + 4 chunks at C=8: clamped), F split in two
    (("Q2_K", "Q2_K", "Q3_K"), ("Q3_K", "Q2_K", "Q3_K"), 768, dict(BF=256, S1=2, BD=256, S2=2, C=16)),
    (("Q5_K", "Q2_K", "Q5_K"), None, 512, dict(BF=256, S1=2, BD=256, S2=2, C=4)),
])
def test_moe_decode_word_variants(qtypes, shared_qtypes, D, kw, monkeypatch):
    """Split-K word-path decode: partials + last-arriver reductions; counters re-armed afterwards."""
    assert _expect_word_path(monkeypatch, qtypes, shared_qtypes)
    (gp, up, dp), (gd, ud, dd), shared, x, slots, w = _decode_case(qtypes, shared_qtypes, D, 512, seed=5)
    out = torch.full((D,), float("nan"))
    moe.moe_decode(x, slots, w, gp, up, dp, qtypes, out, shared=None if shared is None else shared[0],
                   shared_qtypes=shared_qtypes, **kw)
    ref = moe_ref(x, slots[None], w[None], gd, ud, dd, shared=None if shared is None else shared[1])
    check(out, ref, 1e-5)
    for key, (part, cnt) in qm._SPLIT_WS.items():
        assert int(cnt.abs().sum()) == 0, key


@pytest.mark.parametrize("qtypes,shared_qtypes,D,kw", [
    (("Q4_K", "Q4_K", "Q5_K"), ("Q8_0", "Q8_0", "Q8_0"), 768, dict(BF=16, S1=2, BD=256, S2=2)),  # split K
    (("Q2_K", "Q2_K", "Q3_K"), ("Q6_K", "Q3_K", "Q8_0"), 512, dict(BF=32, S1=1, BD=128, S2=1)),
    # C above the gate/up slice (24 Q4_K chunks): one clamped step of 32; the Q8_0 shared rows 2 steps of 16
    (("Q4_K", "Q4_K", "Q5_K"), ("Q8_0", "Q8_0", "Q8_0"), 768, dict(BF=16, S1=1, BD=256, S2=1, C=32)),
    # f-tiles below the 16-row x8 group: 2 x 2 arrivals (2 f-tiles, S1 = 2) per group counter
    (("Q4_K", "Q4_K", "Q5_K"), ("Q6_K", "Q3_K", "Q8_0"), 512, dict(BF=8, S1=2, BD=256, S2=1)),
])
def test_moe_decode_x8(qtypes, shared_qtypes, D, kw, monkeypatch):
    """int8 activations: equal to the reference with the same roundings (x, act), close to the fp one."""
    assert _expect_word_path(monkeypatch, qtypes, shared_qtypes)
    (gp, up, dp), (gd, ud, dd), shared, x, slots, w = _decode_case(qtypes, shared_qtypes, D, 256, seed=7)
    out = torch.full((D,), float("nan"))
    for x8 in (True, qm.quantize_x8(x)):
        out.fill_(float("nan"))
        moe.moe_decode(x, slots, w, gp, up, dp, qtypes, out, shared=shared[0], shared_qtypes=shared_qtypes,
                       x8=x8, **kw)
        check(out, moe_ref_x8(x, slots, w, gd, ud, dd, shared=shared[1]), 1e-4)
    check(out, moe_ref(x, slots[None], w[None], gd, ud, dd, shared=shared[1]), 3e-2)


@pytest.mark.parametrize("qtypes,shared_qtypes,k,kw", [
    (("Q4_K", "Q4_K", "Q5_K"), ("Q8_0", "Q8_0", "Q8_0"), 2, dict(BD=32, S2=2)),  # partials, last arrival per tile
    (("Q8_0", "Q8_0", "Q8_0"), None, 1, dict(BD=64, S2=1)),  # one program per d-tile: stored directly
    (("Q4_K", "Q4_K", "Q5_K"), ("BF16", "BF16", "BF16"), 2, {}),  # tile path: a norm.add_norm_x8n launch after it
])
def test_moe_decode_res_norm(qtypes, shared_qtypes, k, kw):
    """res_norm: the down kernel's last arrival adds the output to the residual and writes the next RMSNorm's
    normed x8 buffer; the same bits as moe_decode's out followed by norm.add_norm_x8n (the two-launch form)."""
    import importlib
    norm = importlib.import_module(qm.__package__ + ".norm")
    D = 256
    (gp, up, dp), _, shared, x, slots, w = _decode_case(qtypes, shared_qtypes, D, 256, seed=21, k=k)
    g = torch.Generator().manual_seed(22)
    res0 = torch.randn(1, D, generator=g).bfloat16()
    nw = 1 + 0.3 * torch.randn(D, generator=g)
    args = (x, slots, w, gp, up, dp, qtypes)
    kw = dict(kw, shared=shared[0] if shared else None, shared_qtypes=shared_qtypes, x8=True)
    out = torch.full((D,), float("nan")).bfloat16()
    moe.moe_decode(*args, out, **kw)
    want_res, want8 = res0.clone(), torch.full((qm.x8n_words(D),), -1, dtype=torch.int32)
    norm.add_norm_x8n(out, want_res, nw, want8)
    res, x8n = res0.clone(), torch.full((qm.x8n_words(D),), -1, dtype=torch.int32)
    moe.moe_decode(*args, torch.empty_like(out), res_norm=(res, nw, x8n), **kw)
    assert torch.equal(res, want_res) and torch.equal(x8n, want8)
    assert not torch.equal(res, res0)


def _router_case(S, k, seed, device="cpu"):
    from kimi_local.kernels.router import route
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(S, generator=g) * 2).to(device)
    bias = (torch.randn(S, generator=g) * 0.1).to(device)
    logits[3] = logits[1]  # a tie: the lower expert id is picked first, as router.route does
    return logits, bias, route


@pytest.mark.parametrize("biased,renorm,x8", [(False, True, False), (True, True, True), (False, False, True)])
def test_moe_decode_route_in_kernel(biased, renorm, x8, monkeypatch):
    """route=(...): the kernels pick the experts and weights from the router's logits themselves; the result
    equals moe_decode on router.route's ids and weights, bit for bit."""
    qtypes, shq = ("Q4_K", "Q4_K", "Q5_K"), ("Q8_0", "Q8_0", "Q8_0")
    assert _expect_word_path(monkeypatch, qtypes, shq)
    S, D, F, k, scale = 6, 256, 256, 3, 2.5
    pools, dense, shared = make_moe(qtypes, S, D, F, shq, seed=11)
    x = torch.randn(D, generator=torch.Generator().manual_seed(12))
    logits, bias, route = _router_case(S, k, 13)
    ids, wts = route(logits[None], bias, k, scale, biased, renorm)
    want = torch.full((D,), float("nan"))
    moe.moe_decode(x, ids[0], wts[0], *pools, qtypes, want, shared=shared[0], shared_qtypes=shq, x8=x8)
    got = torch.full((D,), float("nan"))
    moe.moe_decode(x, logits, None, *pools, qtypes, got, shared=shared[0], shared_qtypes=shq, x8=x8,
                   route=(bias, k, scale, biased, renorm))
    assert torch.equal(got, want)
    monkeypatch.undo()  # (lifts _expect_word_path's guard)
    got.fill_(float("nan"))  # the tile path (non-word types) routes first, then the same result
    moe.moe_decode(x, logits, None, *pools, qtypes, got, shared=shared[0], shared_qtypes=shq, x8=x8, impl="tile",
                   route=(bias, k, scale, biased, renorm))
    check(got, moe_ref(x, ids, wts, *dense, shared=shared[1]), 1e-4 if not x8 else 3e-2)


@pytest.mark.parametrize("qtypes,shared_qtypes", [
    (("Q4_K", "Q4_K", "Q6_K"), ("Q8_0", "Q8_0", "Q8_0")),
    (("Q3_K", "Q5_K", "Q2_K"), None),
])
def test_moe_prefill(qtypes, shared_qtypes):
    S, D, F, k, T = 4, 256, 256, 2, 11
    (gp, up, dp), (gd, ud, dd), shared = make_moe(qtypes, S, D, F, shared_qtypes, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, D, generator=g)
    # slot 1 gets every token (11 rows: two BM=8 tiles), the second choice is one of slots 0, 2, 3
    ids = torch.stack([torch.ones(T, dtype=torch.long),
                       torch.tensor([0, 2, 3])[torch.randint(0, 3, (T,), generator=g)]], 1)
    w = torch.rand(T, k, generator=g)
    out = torch.full((T, D), float("nan"))
    moe.moe_prefill(x, ids, w, gp, up, dp, qtypes, out, shared=None if shared is None else shared[0],
                    shared_qtypes=shared_qtypes, BM=8)
    ref = moe_ref(x, ids, w, gd, ud, dd, shared=None if shared is None else shared[1])
    check(out, ref, 1e-2)  # H is stored in bf16
    out2 = torch.full((T, D), float("nan"))  # the split launch: slot 1's last 3 rows (11 = 8 + 3) in a 4-row tile
    moe.moe_prefill(x, ids, w, gp, up, dp, qtypes, out2, shared=None if shared is None else shared[0],
                    shared_qtypes=shared_qtypes, BM=8, small=4)
    check(out2, ref, 1e-2)


def test_route_tiles():
    S, BM = 5, 4
    ids = torch.tensor([[1, 3], [1, 0], [1, 3], [1, 4], [1, 3]])
    asg, ts, r0, r1 = moe.moe_route_tiles(ids, S, BM)
    flat = ids.reshape(-1)
    assert torch.equal(flat[asg.long()], flat.sort(stable=True).values)
    real = ts < S
    assert int(real.sum()) == 1 + 2 + 1 + 1  # slot 1 has 5 rows -> 2 tiles
    covered = torch.cat([torch.arange(int(a), min(int(a) + BM, int(b))) for a, b in zip(r0[real], r1[real])])
    assert torch.equal(covered, torch.arange(flat.numel()))


@pytest.mark.parametrize("BM,small", [(4, 1), (4, 2), (4, 4), (8, 2)])
def test_route_tiles_split(BM, small):
    """With small tiles: the BM tiles and the small ones (one per slot at most) cover every sorted row exactly once,
    within their slot; a slot's last partial tile goes to the small ones iff it has at most `small` rows."""
    S = 6
    g = torch.Generator().manual_seed(BM * 10 + small)
    ids = torch.stack([torch.randperm(S, generator=g)[:2] for _ in range(23)])  # top-2 of 6 slots
    ids[:9, 0] = 1  # slot 1: 9+ rows
    flat = ids.reshape(-1)
    asg, big, sm = moe.moe_route_tiles(ids, S, BM, small)
    asg0, *plain = moe.moe_route_tiles(ids, S, BM)
    assert torch.equal(asg, asg0)
    srt = flat[asg.long()]
    counts = torch.bincount(flat, minlength=S)
    rows = []
    for (ts, r0, r1), bm in ((big, BM), (sm, small)):
        for s, a, b in zip(ts.tolist(), r0.tolist(), r1.tolist()):
            if s < S:
                r = torch.arange(a, min(a + bm, b))
                assert len(r) > 0 and bool((srt[r] == s).all())
                rows.append(r)
    assert torch.equal(torch.cat(rows).sort().values, torch.arange(flat.numel()))
    rem = counts % BM
    assert torch.equal(sm[0] < S, (rem > 0) & (rem <= small))
    assert int((big[0] < S).sum()) == int(((counts - torch.where(sm[0] < S, rem, 0) + BM - 1) // BM).sum())


# ------------------------------------------------------------------------------------------------
# GPU, real shapes: D=2304, F=1024, 256 experts, top-8 + shared


@pytest.mark.cuda
@pytest.mark.parametrize("qtypes", [("Q4_K", "Q4_K", "Q5_K"), ("Q3_K", "Q3_K", "Q4_K"), ("Q2_K", "Q2_K", "Q3_K"),
                                    ("Q4_K", "Q4_K", "Q6_K"), ("Q8_0", "Q6_K", "Q3_K")])
def test_cuda_moe_decode(qtypes):
    S, D, F, k = 256, 2304, 1024, 8
    shq = ("Q8_0", "Q8_0", "Q6_K")
    g = torch.Generator().manual_seed(7)
    pools = [make_pool(qt, S, r, c, "cuda", g, 0.002, dense=False)[0]
             for qt, r, c in zip(qtypes, (F, F, D), (D, D, F))]
    shared, shared_d = [], []
    for qt, r, c in zip(shq, (F, F, D), (D, D, F)):
        p, dq = make_pool(qt, 1, r, c, "cuda", g, 0.002)
        shared.append(p[0]), shared_d.append(dq[0])
    x = torch.randn(D, generator=g).to("cuda", torch.bfloat16)  # from g: the x8-vs-fp distance is data-dependent
    slots = torch.randperm(S, generator=g)[:k].to(torch.int32).cuda()
    w = torch.rand(k, generator=g).cuda()
    out = torch.empty(D, device="cuda", dtype=torch.float32)
    moe.moe_decode(x, slots, w, *pools, qtypes, out, shared=shared, shared_qtypes=shq)  # autotune
    sel = slots.long()
    raw_dense = []
    for pool, qt, (r, c) in zip(pools, qtypes, ((F, D), (F, D), (D, F))):
        raw_dense.append(torch.stack([qm.dequantize_gpu(pool[s], qt, (r, c), out=torch.empty(r, c, device="cuda"))
                                     for s in sel.tolist()]))  # fp32: exact weights
    ref = moe_ref(x, torch.arange(k, device="cuda")[None], w[None], *raw_dense, shared=shared_d)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe.moe_decode(x, slots, w, *pools, qtypes, out, shared=shared, shared_qtypes=shq)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(out, ref, 1e-5)
    # int8 activations (x8): x and each expert's act rounded like the reference. The kernel's act comes from
    # its own fp32 sums; where a dot product cancels, that moves some act values across a rounding boundary
    # (one int8 step each: 2.6e-3 relative measured for Q3_K gate/up on an H200). Random K-quant blocks (with
    # their mins) give every output row a large common mean, so such steps move all outputs the same way:
    # 5.4e-3 measured for Q4_K/Q4_K/Q5_K with this seed (H200, session 9), hence 1e-2
    ref8 = moe_ref_x8(x, torch.arange(k, device="cuda"), w, *raw_dense, shared=shared_d)
    for x8, kw in ((True, {}), (qm.quantize_x8(x), {}), (True, dict(BF=4, S1=1, BD=16, S2=2)),
                   (True, dict(BF=8, S1=3, BD=8, S2=1))):  # small f-tiles: 16-row group counters
        out.fill_(float("nan"))
        moe.moe_decode(x, slots, w, *pools, qtypes, out, shared=shared, shared_qtypes=shq, x8=x8, **kw)
        torch.cuda.synchronize()
        check(out, ref8, 1e-2)
    check(out, ref, 3e-2)


def _dense_case(qts, seed):
    """Layer 0's dense FFN ([9216, 2304] gate / up, [2304, 9216] down, types qts) packed on the GPU as the only
    ("shared") expert: (D, packed mats, dequantized, x bf16 [D], an empty routed-id tensor)."""
    D, F = 2304, 9216
    g = torch.Generator().manual_seed(seed)
    mats, dense = [], []
    for qt, r, c in zip(qts, (F, F, D), (D, D, F)):
        p, dq = make_pool(qt, 1, r, c, "cuda", g, 0.002)
        mats.append(p[0]), dense.append(dq[0])
    x = torch.randn(D, generator=g).to("cuda", torch.bfloat16)
    return D, mats, dense, x, torch.empty(0, dtype=torch.int32, device="cuda")


@pytest.mark.cuda
def test_cuda_dense_ffn_decode():
    """Layer 0's dense FFN ([9216, 2304] gate/up, [2304, 9216] down) as the only ("shared") expert, x8, the
    default config for E = 1 (more F-splits of down) and KIMI_LOCAL_DENSE_S2=0's, against the x8 reference."""
    qts = ("Q4_K", "Q4_K", "Q6_K")
    D, mats, dense, x, none_i = _dense_case(qts, 11)
    F = 9216
    ref8 = moe_ref_x8(x, none_i, [], None, None, None, shared=dense)
    for s2 in ("1", "0"):
        os.environ["KIMI_LOCAL_DENSE_S2"] = s2
        try:
            out = torch.full((D,), float("nan"), device="cuda", dtype=torch.float32)
            moe.moe_decode(x, none_i, none_i.float(), *(m[None] for m in mats), qts, out, shared=mats,
                           shared_qtypes=qts, x8=True)
            torch.cuda.synchronize()
        finally:
            os.environ.pop("KIMI_LOCAL_DENSE_S2")
        check(out, ref8, 5e-3)
    assert moe.moe_decode_config(qts, qts, D, F, x8=True, E=1)[3] == 18


@pytest.mark.cuda
def test_cuda_moe_decode_route_in_kernel():
    """Real shapes (256 experts, top-8, Q4_K/Q4_K/Q5_K + Q8_0 shared, x8), PDL on, in a CUDA graph: the kernels'
    own top-k from the logits equals moe_decode on router.route's ids and weights, bit for bit."""
    from kimi_local.kernels import pdl as P
    S, D, F, k = 256, 2304, 1024, 8
    qtypes, shq = ("Q4_K", "Q4_K", "Q5_K"), ("Q8_0", "Q8_0", "Q8_0")
    g = torch.Generator().manual_seed(8)
    pools = [make_pool(qt, S, r, c, "cuda", g, 0.002, dense=False)[0] for qt, r, c in zip(qtypes, (F, F, D), (D, D, F))]
    shared = [make_pool(qt, 1, r, c, "cuda", g, 0.002, dense=False)[0][0] for qt, r, c in zip(shq, (F, F, D), (D, D, F))]
    x = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    logits, bias, route = _router_case(S, k, 9, "cuda")
    ids, wts = route(logits[None], bias, k, 2.446, False, True)
    want = torch.empty(D, device="cuda", dtype=torch.bfloat16)
    moe.moe_decode(x, ids[0], wts[0], *pools, qtypes, want, shared=shared, shared_qtypes=shq, x8=True)
    got = torch.empty_like(want)
    kw = dict(shared=shared, shared_qtypes=shq, x8=True, route=(bias, k, 2.446, False, True))
    with P.active(P.supported("cuda")):
        moe.moe_decode(x, logits, None, *pools, qtypes, got, **kw)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            moe.moe_decode(x, logits, None, *pools, qtypes, got, **kw)
    got.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)


REAL = (256, 2304, 1024, 8)  # S experts, D, F, top-k: the real decode shapes


def _real_case(qtypes, shq, seed):
    """The real-shape decode inputs on the GPU: (expert pools, shared packed or None, shared dense or None, x bf16 [D],
    router logits, selection bias, router.route); the router case is seeded with seed + 1."""
    S, D, F, k = REAL
    g = torch.Generator().manual_seed(seed)
    pools = [make_pool(qt, S, r, c, "cuda", g, 0.002, dense=False)[0] for qt, r, c in zip(qtypes, (F, F, D), (D, D, F))]
    shared = shared_d = None
    if shq:
        shared, shared_d = [], []
        for qt, r, c in zip(shq, (F, F, D), (D, D, F)):
            p, dq = make_pool(qt, 1, r, c, "cuda", g, 0.002)
            shared.append(p[0]), shared_d.append(dq[0])
    x = torch.randn(D, generator=g).to("cuda", torch.bfloat16)
    return (pools, shared, shared_d, x) + _router_case(S, k, seed + 1, "cuda")


def _real_ref8(pools, qtypes, ids, wts, x, shared_d):
    """moe_ref_x8 of the picked experts (dequantized on the GPU)."""
    S, D, F, k = REAL
    raw_dense = [torch.stack([qm.dequantize_gpu(pool[s], qt, (r, c), out=torch.empty(r, c, device="cuda"))
                              for s in ids.tolist()])
                 for pool, qt, (r, c) in zip(pools, qtypes, ((F, D), (F, D), (D, F)))]
    return moe_ref_x8(x, torch.arange(k, device="cuda"), wts, *raw_dense, shared=shared_d)


@pytest.mark.cuda
@pytest.mark.parametrize("qtypes,shq,route", [
    (("Q4_K", "Q4_K", "Q5_K"), ("Q8_0", "Q8_0", "Q8_0"), True),  # the Q4_K_M recipe, as the engine calls it
    (("Q4_K", "Q4_K", "Q5_K"), ("Q8_0", "Q8_0", "Q8_0"), False),
    (("Q4_K", "Q4_K", "Q4_K"), ("Q4_K", "Q4_K", "Q4_K"), True),  # uniform Q4_K
    (("Q8_0", "Q8_0", "Q8_0"), None, False)])
@pytest.mark.parametrize("unroll", [None, 0, "unpaired"])
def test_cuda_moe_gluon_gate_up(qtypes, shq, route, unroll, monkeypatch):
    """kernels/moe_gluon.py's gate/up (the default on Hopper for these types) against the Triton word path at real
    shapes: the act rows (x8, dequantized) within the x8 rounding, the output against the x8 reference, and under
    PDL a graph replay equal to the eager call, bit for bit. unroll: KIMI_LOCAL_MOE_GLUON_UNROLL (None: the default,
    the stage loop unrolled, gate and up stages paired; 0: rolled; "unpaired": KIMI_LOCAL_MOE_GLUON_PAIR=0)."""
    from kimi_local.kernels import moe_gluon, pdl as P
    if unroll == "unpaired":
        monkeypatch.setenv("KIMI_LOCAL_MOE_GLUON_PAIR", "0")
    elif unroll is not None:
        monkeypatch.setenv("KIMI_LOCAL_MOE_GLUON_UNROLL", str(unroll))
    S, D, F, k = REAL
    if not moe_gluon.supported("cuda", qtypes[0], qtypes[1], *(shq or qtypes)[:2], D, F):
        pytest.skip("the Gluon gate/up needs Gluon and a Hopper GPU")
    pools, shared, shared_d, x, logits, bias, route_fn = _real_case(qtypes, shq, 21)
    ids, wts = route_fn(logits[None], bias, k, 2.446, False, True)
    kw = dict(shared=shared, shared_qtypes=shq, x8=True)
    if route:
        kw["route"] = (bias, k, 2.446, False, True)
    args = (logits, None) if route else (ids[0], wts[0])
    E = k + int(shq is not None)
    nw = qm.x8_words(F)
    acts, outs = [], []
    for gluon in (False, True):
        ws = torch.full((E * F,), float("nan"), device="cuda")
        out = torch.full((D,), float("nan"), device="cuda")
        moe.moe_decode(x, *args, *pools, qtypes, out, workspace=ws, gluon=gluon, **kw)
        torch.cuda.synchronize()
        acts.append(torch.stack([qm.dequantize_x8(r, F) for r in ws.view(torch.int32)[:E * nw].view(E, nw)]))
        outs.append(out)
    check(acts[1], acts[0], 1e-2)
    ref8 = _real_ref8(pools, qtypes, ids[0], wts[0], x, shared_d)
    check(outs[1], ref8, 1e-2)
    check(outs[1], outs[0], 1e-2)
    got = torch.empty(D, device="cuda")
    with P.active(P.supported("cuda")):
        moe.moe_decode(x, *args, *pools, qtypes, got, gluon=True, **kw)
        want = got.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            moe.moe_decode(x, *args, *pools, qtypes, got, gluon=True, **kw)
    got.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want) and torch.equal(got, outs[1])


def _graph_and_res_norm(call, D):
    """Under PDL: call(out) (one MoE decode into out [D] bf16) eagerly, then in a CUDA graph replayed 3 times (the
    arrival counters re-arm: every replay equals the eager call, bit for bit); then call(out, res_norm=...) (the
    engine's residual add + next norm in the down kernel's last arrival) against out + norm.add_norm_x8n: the
    residual bit for bit, the int8 groups and scales but for rare rounding ties (the products and sums are formed
    in other orders), the groups' sums of squares within fp32 rounding. Returns the eager out."""
    from kimi_local.kernels import pdl as P
    from kimi_local.kernels.norm import add_norm_x8n
    got = torch.empty(D, device="cuda", dtype=torch.bfloat16)  # the engine's out dtype
    with P.active(P.supported("cuda")):
        call(got)
        want = got.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call(got)
        for _ in range(3):
            got.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(got, want)
        res0 = torch.randn(1, D, device="cuda").bfloat16()
        nw = 1 + 0.3 * torch.randn(D, device="cuda")
        want_res, want8 = res0.clone(), torch.full((qm.x8n_words(D),), -1, dtype=torch.int32, device="cuda")
        add_norm_x8n(want, want_res, nw, want8)
        res, x8n = res0.clone(), torch.full_like(want8, -1)
        call(torch.empty_like(got), res_norm=(res, nw, x8n))
        torch.cuda.synchronize()
    assert torch.equal(res, want_res)
    assert (x8n[:D // 4].view(torch.int8) != want8[:D // 4].view(torch.int8)).sum().item() <= D // 500
    G = D // 16
    dx, sq, ss = (x8n[D // 4 + j * G:D // 4 + (j + 1) * G].view(torch.float32) for j in range(3))
    wdx, wsq, wss = (want8[D // 4 + j * G:D // 4 + (j + 1) * G].view(torch.float32) for j in range(3))
    torch.testing.assert_close(dx, wdx, rtol=1e-5, atol=0)
    assert ((sq - wsq).abs() <= 1.01 * dx + 1e-6).all()  # a tie moves a group's int8 sum by one
    torch.testing.assert_close(ss, wss, rtol=1e-5, atol=0)
    return want


@pytest.mark.cuda
@pytest.mark.parametrize("qts", [("Q8_0", "Q8_0", "Q8_0"), ("Q4_K", "Q4_K", "Q4_K")])  # Q4_K_M's layer 0; uniform
def test_cuda_dense_ffn_gluon_down(qts, monkeypatch):
    """Layer 0's dense FFN (F = 9216) with its down on the Gluon down kernel in column slices (moe_gluon.dense_slices,
    the default on Hopper) against the Triton down kernel (KIMI_LOCAL_DENSE_GLUON_DOWN=0; same act, fp32 sums in
    other orders: within 1e-4) and the x8 reference; under PDL a graph replay equals the eager call bit for bit, and
    with res_norm the residual equals out + add_norm_x8n's."""
    from kimi_local.kernels import moe_gluon
    if not moe_gluon.dense_slices("cuda", qts[2], 2304, 9216):
        pytest.skip("the Gluon down kernel needs Gluon and a Hopper GPU")
    assert moe_gluon.dense_slices("cuda", qts[2], 2304, 9216) == 9
    D, mats, dense, x, none_i = _dense_case(qts, 12)
    args = (x, none_i, none_i.float(), *(m[None] for m in mats), qts)
    kw = dict(shared=mats, shared_qtypes=qts, x8=True)
    outs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("KIMI_LOCAL_DENSE_GLUON_DOWN", flag)
        out = torch.full((D,), float("nan"), device="cuda")
        moe.moe_decode(*args, out, **kw)
        torch.cuda.synchronize()
        outs.append(out)
    check(outs[1], outs[0], 1e-4)
    check(outs[1], moe_ref_x8(x, none_i, [], None, None, None, shared=dense), 5e-3)
    _graph_and_res_norm(lambda out, **k: moe.moe_decode(*args, out, **kw, **k), D)


@pytest.mark.cuda
@pytest.mark.parametrize("qtypes,shq,route", [
    (("Q4_K", "Q4_K", "Q5_K"), ("Q8_0", "Q8_0", "Q8_0"), (False, True)),  # the Q4_K_M recipe, as the engine calls it
    (("Q4_K", "Q4_K", "Q5_K"), ("Q8_0", "Q8_0", "Q8_0"), None),
    (("Q4_K", "Q4_K", "Q5_K"), ("Q8_0", "Q8_0", "Q8_0"), (True, False)),  # biased weights, no renormalisation
    (("Q4_K", "Q4_K", "Q4_K"), ("Q4_K", "Q4_K", "Q4_K"), (False, True)),  # uniform Q4_K
    (("Q8_0", "Q8_0", "Q8_0"), None, None)])
@pytest.mark.parametrize("ns", [None, 3, "rolled"])
def test_cuda_moe_gluon_down(qtypes, shq, route, ns, monkeypatch):
    """kernels/moe_gluon.py's down kernel after the Triton gate/up (same act) against the Triton down kernel at real
    shapes (both reduce in fp32, in other orders: within 1e-4), against the x8 reference, and under PDL a graph
    replay equal to the eager call, bit for bit. ns: the ring stages (3: the Q5_K rows take a second pass), or
    "rolled": the default ring with KIMI_LOCAL_MOE_GLUON_DOWN_UNROLL=0 (the stage loop not unrolled)."""
    from kimi_local.kernels import moe_gluon
    S, D, F, k = REAL
    if not moe_gluon.down_supported("cuda", qtypes[2], shq[2] if shq else None, D, F, k):
        pytest.skip("the Gluon down kernel needs Gluon and a Hopper GPU")
    if ns == "rolled":
        monkeypatch.setenv("KIMI_LOCAL_MOE_GLUON_DOWN_UNROLL", "0")
    elif ns:
        monkeypatch.setenv("KIMI_LOCAL_MOE_GLUON_DOWN_NS", str(ns))
    pools, shared, shared_d, x, logits, bias, route_fn = _real_case(qtypes, shq, 23)
    biased, renorm = route or (False, True)
    ids, wts = route_fn(logits[None], bias, k, 2.446, biased, renorm)
    kw = dict(shared=shared, shared_qtypes=shq, x8=True, gluon=False)
    if route:
        kw["route"] = (bias, k, 2.446, biased, renorm)
    args = (logits, None) if route else (ids[0], wts[0])
    outs = []
    for gd in (False, True):
        out = torch.full((D,), float("nan"), device="cuda")
        moe.moe_decode(x, *args, *pools, qtypes, out, gluon_down=gd, **kw)
        torch.cuda.synchronize()
        outs.append(out)
    check(outs[1], outs[0], 1e-4)
    ref8 = _real_ref8(pools, qtypes, ids[0], wts[0], x, shared_d)
    check(outs[1], ref8, 1e-2)
    kw["gluon"] = None  # the default pair: Gluon gate/up (where it applies) and Gluon down
    want = _graph_and_res_norm(lambda out, **k: moe.moe_decode(x, *args, *pools, qtypes, out, **kw, **k), D)
    check(want.float(), ref8, 1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 37, 512, 8192])  # 8192: 256-row tiles
@pytest.mark.parametrize("qtypes", [("Q4_K", "Q4_K", "Q5_K"), ("Q3_K", "Q3_K", "Q6_K")])
def test_cuda_moe_prefill(T, qtypes):
    S, D, F, k = 256, 2304, 1024, 8
    g = torch.Generator().manual_seed(8)
    pools = [make_pool(qt, S, r, c, "cuda", g, 0.002, dense=False)[0]
             for qt, r, c in zip(qtypes, (F, F, D), (D, D, F))]
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(T, S, generator=g).topk(k, dim=1).indices.cuda()
    w = torch.rand(T, k, generator=g).cuda()
    out = torch.full((T, D), float("nan"), device="cuda", dtype=torch.bfloat16)
    moe.moe_prefill(x, ids, w, *pools, qtypes, out)
    ref = moe_ref(x, ids, w, *_dense_used(pools, qtypes, ids, S, D, F))
    torch.cuda.synchronize()
    check(out.float(), ref, 1e-2)


def _dense_used(pools, qtypes, ids, S, D, F):
    """The gate, up and down pools as bf16 [S, rows, K] on the GPU, dequantized for the slots in ids (others 0)."""
    dense = []
    for pool, qt, (r, c) in zip(pools, qtypes, [(F, D), (F, D), (D, F)]):
        d = torch.zeros(S, r, c, device="cuda", dtype=torch.bfloat16)
        for s in ids.unique().tolist():
            d[s] = qm.dequantize_gpu(pool[s], qt, (r, c))
        dense.append(d)
    return dense


_POOLS = {}


def _cuda_pool(qt, S, r, c):
    """A random expert pool on the GPU, made once per shape and type for the tests that only read it."""
    if (qt, S, r, c) not in _POOLS:
        _POOLS[(qt, S, r, c)] = make_pool(qt, S, r, c, "cuda", torch.Generator().manual_seed(r + c), 0.002,
                                          dense=False)[0]
    return _POOLS[(qt, S, r, c)]


@pytest.mark.cuda
@pytest.mark.parametrize("T,skew", [(1, False), (37, False), (300, True), (2048, False), (8192, False)])
@pytest.mark.parametrize("qtypes", [("Q4_K", "Q4_K", "Q4_K"), ("Q4_K", "Q4_K", "Q5_K"), ("Q5_K", "Q5_K", "Q6_K")])
def test_cuda_moe_prefill_gluon(T, skew, qtypes, monkeypatch):
    """The Gluon Q4_K / Q5_K grouped GEMMs (kernels/moe_prefill_gluon.py): against the dequantized bf16 reference and
    the Triton grouped kernels (KIMI_LOCAL_MOE_PREFILL_GLUON=0). Tiles of 16 (T=1, 37: mostly one row; 3 ring stages),
    64 (T=2048; 3 stages) and, at T=8192, 256 rows for gate/up (one tile an expert) and 128 for down (two; 5 stages);
    skew: 300 tokens over 10 experts (240 rows each: 16-row tiles, 15 of them an expert). From T=2048 an expert's last
    partial tile of at most a quarter of BM rows goes to a second launch of small tiles (moe.prefill_split: 16 rows at
    T=2048, 64 / 32 at 8192), in both paths. Q6_K down: the Gluon gate/up beside the Triton down kernel."""
    from kimi_local.kernels import moe_prefill_gluon
    S, D, F, k = 256, 2304, 1024, 8
    if not moe_prefill_gluon.supported("cuda", "Q4_K", F, D):
        pytest.skip("needs Gluon and a Hopper GPU")
    g = torch.Generator().manual_seed(9 + T)
    pools = [_cuda_pool(qt, S, r, c) for qt, r, c in zip(qtypes, (F, F, D), (D, D, F))]
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    if skew:
        ids = (torch.rand(T, 10, generator=g).topk(k, dim=1).indices * 25 + 3).cuda()
    else:
        ids = torch.rand(T, S, generator=g).topk(k, dim=1).indices.cuda()
    w = torch.rand(T, k, generator=g).cuda()
    out = torch.full((T, D), float("nan"), device="cuda", dtype=torch.bfloat16)
    moe.moe_prefill(x, ids, w, *pools, qtypes, out)
    monkeypatch.setenv("KIMI_LOCAL_MOE_PREFILL_GLUON", "0")
    out_t = torch.full((T, D), float("nan"), device="cuda", dtype=torch.bfloat16)
    moe.moe_prefill(x, ids, w, *pools, qtypes, out_t)
    ref = moe_ref(x, ids, w, *_dense_used(pools, qtypes, ids, S, D, F))
    torch.cuda.synchronize()
    print(f"T={T} {qtypes}: rel RMSE gluon {rel_rmse(out.float(), ref):.2e}, triton {rel_rmse(out_t.float(), ref):.2e}")
    check(out.float(), ref, 1e-2)
    check(out.float(), out_t.float(), 1e-2)


def test_moe_prefill_gluon_dispatch(monkeypatch):
    """moe_prefill's plumbing around the Gluon prefill kernels, on the CPU with stand-ins that compute their outputs
    from the dense weights: which halves go there (types, dtype), their tile sizes (gate/up 16..256, down at most
    DOWN_MAX_BM, each with its own tile table over the same sort), and that H and Y meet the Triton halves'."""
    from kimi_local.kernels import moe_prefill_gluon as PG
    S, D, F, k, T = 4, 256, 256, 2, 40
    qtypes = ("Q4_K", "Q4_K", "Q5_K")
    (gp, up, dp), (gd, ud, dd), _ = make_moe(qtypes, S, D, F, None, seed=4)
    calls = []

    def gate_up(x, tok, ts, r0, r1, gpool, upool, h, qt, BM, NS=0):
        calls.append(("gate_up", qt, BM, ts.numel()))
        for t in range(ts.numel()):
            s = int(ts[t])
            if s < S:
                rows = torch.arange(int(r0[t]), min(int(r0[t]) + BM, int(r1[t])))
                xs = x[tok[rows].long()].float()
                h[rows] = (torch.nn.functional.silu(xs @ gd[s].t()) * (xs @ ud[s].t())).to(h.dtype)

    def down(h, asg, wf, ts, r0, r1, dpool, y, qt, BM, NS=0):
        calls.append(("down", qt, BM, ts.numel()))
        for t in range(ts.numel()):
            s = int(ts[t])
            if s < S:
                rows = torch.arange(int(r0[t]), min(int(r0[t]) + BM, int(r1[t])))
                a = asg[rows].long()
                y[a] = (h[rows].float() @ dd[s].t()) * wf[a][:, None]

    monkeypatch.setattr(PG, "supported", lambda device, qtype, N, K: qtype in PG.QTYPES)
    monkeypatch.setattr(PG, "gate_up", gate_up)
    monkeypatch.setattr(PG, "down", down)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, D, generator=g).bfloat16()
    ids = torch.stack([torch.ones(T, dtype=torch.long), torch.tensor([0, 2, 3])[torch.randint(0, 3, (T,),
                                                                                               generator=g)]], 1)
    w = torch.rand(T, k, generator=g)
    ref = moe_ref(x.float(), ids, w, gd, ud, dd)
    # BM=256: every slot's rows (13-40) are a partial tile of at most 256 / 4 rows: each half's BM launch (all tiles
    # empty) is followed by one of small tiles (moe.prefill_split)
    for BM, want in ((8, [("gate_up", "Q4_K", 16), ("down", "Q5_K", 16)]),
                     (256, [("gate_up", "Q4_K", 256), ("gate_up", "Q4_K", 64), ("down", "Q5_K", PG.DOWN_MAX_BM),
                            ("down", "Q5_K", PG.DOWN_MAX_BM // 4)])):
        calls.clear()
        out = torch.full((T, D), float("nan")).bfloat16()
        moe.moe_prefill(x, ids, w, gp, up, dp, qtypes, out, BM=BM)
        assert [c[:3] for c in calls] == want
        check(out.float(), ref, 1e-2)
    calls.clear()  # fp32 activations: gate/up stays on the Triton kernel, down still goes to the Gluon one
    out = torch.full((T, D), float("nan"))
    moe.moe_prefill(x.float(), ids, w, gp, up, dp, qtypes, out, BM=8)
    assert [c[:3] for c in calls] == [("down", "Q5_K", 16)]
    check(out, ref, 1e-2)
    monkeypatch.setenv("KIMI_LOCAL_MOE_PREFILL_GLUON", "0")
    calls.clear()
    moe.moe_prefill(x, ids, w, gp, up, dp, qtypes, out, BM=8)
    assert calls == []


def test_moe_prefill_config_prune():
    """The grouped GEMMs' autotuner never tries accumulators of more than 128 fp32 registers per thread."""
    prune = moe._acc_prune(2)["early_config_prune"]
    cfgs = [triton.Config({"BN": bn, "G": 4}, num_warps=nw) for bn, nw in ((64, 4), (128, 8), (64, 8), (32, 4))]
    kept = [(c.kwargs["BN"], c.num_warps) for c in prune(cfgs, {}, BM=256)]
    assert kept == [(64, 8), (32, 4)]
    assert len(prune(cfgs, {}, BM=128)) == 4
    assert len(moe._acc_prune(1)["early_config_prune"](cfgs, {}, BM=256)) == 4


def test_moe_gluon_dispatch(monkeypatch):
    """Where the Gluon gate/up applies: never on the CPU, only Q4_K / Q8_0 with gate and up of one type; the
    KIMI_LOCAL_MOE_GLUON=0 switch."""
    from kimi_local.kernels import moe_gluon
    assert not moe_gluon.supported("cpu", "Q4_K", "Q4_K", "Q8_0", "Q8_0", 2304, 1024)
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and moe_gluon.HAVE_GLUON:
        assert moe_gluon.supported("cuda", "Q4_K", "Q4_K", "Q8_0", "Q8_0", 2304, 1024)
        for bad in (("Q4_K", "Q5_K", "Q8_0", "Q8_0"), ("Q2_K", "Q2_K", "Q8_0", "Q8_0"),
                    ("Q4_K", "Q4_K", "Q6_K", "Q6_K")):
            assert not moe_gluon.supported("cuda", *bad, 2304, 1024)
        assert not moe_gluon.supported("cuda", "Q4_K", "Q4_K", "Q8_0", "Q8_0", 2304 + 128, 1024)
    assert not moe_gluon.down_supported("cpu", "Q5_K", "Q8_0", 2304, 1024, 8)
    assert moe_gluon.dense_slices("cpu", "Q8_0", 2304, 9216) == 0
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and moe_gluon.HAVE_GLUON:
        assert moe_gluon.down_supported("cuda", "Q5_K", "Q8_0", 2304, 1024, 8)
        assert moe_gluon.down_supported("cuda", "Q8_0", None, 2304, 1024, 8)
        assert not moe_gluon.down_supported("cuda", "Q6_K", "Q8_0", 2304, 1024, 8)
        assert not moe_gluon.down_supported("cuda", "Q5_K", "Q8_0", 2304, 9216, 8)  # F too long for one CTA
        assert not moe_gluon.down_supported("cuda", "Q8_0", "Q8_0", 2304, 1024, 0)  # the dense layer: no routed
        assert moe_gluon.dense_slices("cuda", "Q8_0", 2304, 9216) == 9  # ... but in column slices
        assert moe_gluon.dense_slices("cuda", "Q4_K", 2304, 2560) == 5  # slices of 512: 1024 / 768 / 640 do not fit
        assert moe_gluon.dense_slices("cuda", "Q6_K", 2304, 9216) == 0
    monkeypatch.setenv("KIMI_LOCAL_MOE_GLUON_DOWN", "0")
    assert not moe_gluon.down_enabled()
    monkeypatch.setenv("KIMI_LOCAL_MOE_GLUON", "0")
    assert not moe_gluon.enabled() and not moe_gluon.down_enabled()
    monkeypatch.setenv("KIMI_LOCAL_MOE_GLUON", "1")
    assert moe_gluon.enabled() == moe_gluon.HAVE_GLUON


def test_moe_gluon_gate_up_launch_prefetch(monkeypatch):
    """The Gluon gate/up launch's prefetch settings (no GPU: the kernel is replaced by a recorder): by default the
    routed CTAs prefetch their side planes only (PF 1) and the shared expert's CTAs also their main plane before the
    wait (SPF 2, session 13); the knobs override them; with side words through the ring (SS) neither prefetches."""
    from kimi_local.kernels import moe_gluon
    if not moe_gluon.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.update(kw, grid=grid)
            return launch

    monkeypatch.setattr(moe_gluon, "moe_gate_up_gluon_kernel", Recorder())
    monkeypatch.setattr(moe_gluon, "_pin_carveout", lambda k: None)
    F, D, S = 64, 256, 4
    pools = [torch.zeros(S, F, 144 * D // 256, dtype=torch.uint8) for _ in range(2)]
    shared = tuple(torch.zeros(F, 144 * D // 256, dtype=torch.uint8) for _ in range(2))
    act = torch.zeros(3, F // 4 + F // 8, dtype=torch.int32)
    ids = torch.zeros(2, dtype=torch.int32)

    def launch():
        seen.clear()
        moe_gluon.gate_up(torch.zeros(D // 4 + D // 8, dtype=torch.int32), ids, ids, *pools, shared, act, D, "Q4_K",
                          "Q4_K", 2, False, True)
        return seen["PF"], seen["SPF"], seen["grid"]

    assert launch() == (moe_gluon.DEFAULT_PF, moe_gluon.DEFAULT_SPF, (F // 16 * 3,)) == (1, 2, (12,))
    monkeypatch.setenv("KIMI_LOCAL_MOE_GLUON_PF", "2")
    monkeypatch.setenv("KIMI_LOCAL_MOE_GLUON_SPF", "1")
    assert launch()[:2] == (2, 1)
    monkeypatch.delenv("KIMI_LOCAL_MOE_GLUON_PF")
    monkeypatch.delenv("KIMI_LOCAL_MOE_GLUON_SPF")
    monkeypatch.setenv("KIMI_LOCAL_MOE_GLUON_SS", "1")
    assert launch()[:2] == (0, 0)
