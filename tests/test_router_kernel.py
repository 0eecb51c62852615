"""Router kernel vs naive.route (selection by biased score, weights by unbiased score)."""
import pytest
import torch

from kimi_local.kernels import naive
from kimi_local.kernels import router as router_mod
from kimi_local.kernels.router import norm_router_route, route, route_tokens, router_logits, router_route


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


def _same_selection(ids, wts, ids_ref, w_ref, rel=1e-5, abs=1e-6):
    for t in range(ids_ref.shape[0]):
        ref = dict(zip(ids_ref[t].tolist(), w_ref[t].tolist()))
        got = dict(zip(ids[t].cpu().tolist(), wts[t].cpu().tolist()))
        assert set(got) == set(ref)
        for e in ref:
            assert got[e] == pytest.approx(ref[e], rel=rel, abs=abs)


@pytest.mark.parametrize("T,E,D,BE,BD", [(1, 37, 50, 4, 16), (3, 16, 300, 8, 64), (2, 9, 7, 2, 16),
                                         (1, 256, 288, None, None)])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32])
def test_router_logits_matches_fp32_gemm(T, E, D, BE, BD, xdtype):
    """The router GEMV reads x in its own dtype (bf16 from the norm, no cast kernel), fp32 weights,
    fp32 accumulation; odd E and D exercise the masks, D > BD the loop."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(E * D + T)
    x = torch.randn(T, D, generator=g).to(xdtype)
    w = torch.randn(E, D, generator=g)
    out = torch.full((T, E), float("nan"), device=dev)
    got = router_logits(x.to(dev), w.to(dev), out, BE=BE, BD=BD)
    assert got is out
    torch.testing.assert_close(out.cpu(), x.float() @ w.t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("T,E,D,k,BE,BD,biased", [(1, 37, 50, 3, 4, 16, False), (3, 16, 300, 4, 8, 64, True),
                                                   (2, 9, 7, 1, 2, 16, False), (1, 64, 288, 8, None, None, False)])
def test_router_route_one_launch(T, E, D, k, BE, BD, biased):
    """GEMV + top-k in one launch (the last program of each token selects): the reference's experts and
    weights, twice in a row (the arrival counters are re-armed by the kernel)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(E * D + T + k)
    w = torch.randn(E, D, generator=g)
    bias = 0.3 * torch.randn(E, generator=g)
    for _ in range(2):
        x = torch.randn(T, D, generator=g).to(torch.bfloat16)
        ids_ref, w_ref = naive.route(x, w, bias, k, 2.446, biased_weights=biased)
        ids, wts = router_route(x.to(dev), w.to(dev), bias.to(dev), k, 2.446, biased_weights=biased, BE=BE, BD=BD)
        _same_selection(ids, wts, ids_ref, w_ref)
        assert int(router_mod._CNT[str(ids.device)].abs().sum()) == 0


@pytest.mark.parametrize("fused", ["1", "0"])
@pytest.mark.parametrize("T", [1, 2, 9])  # 9 > GEMV_MAX_TOKENS: the fp32 GEMM path
def test_route_tokens_matches_reference(T, fused, monkeypatch):
    monkeypatch.setenv("KIMI_LOCAL_ROUTE_FUSED", fused)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    E, D, k = 24, 40, 5
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, D, generator=g).to(torch.bfloat16)
    w = torch.randn(E, D, generator=g)
    bias = 0.3 * torch.randn(E, generator=g)
    ids_ref, w_ref = naive.route(x, w, bias, k, 2.446)
    ids, wts = route_tokens(x.to(dev), w.to(dev), bias.to(dev), k, 2.446)
    assert ids.dtype == torch.int32 and wts.dtype == torch.float32
    _same_selection(ids, wts, ids_ref, w_ref)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 4])
def test_cuda_route_tokens_real_shapes(T):
    """Real router: 256 experts x 2304, fp32 weights, bf16 activations, top-8, scale 2.446."""
    g = torch.Generator().manual_seed(T)
    E, D, k = 256, 2304, 8
    x = torch.randn(T, D, generator=g).to(torch.bfloat16)
    w = 0.02 * torch.randn(E, D, generator=g)
    bias = 0.05 * torch.randn(E, generator=g)
    logits = router_logits(x.cuda(), w.cuda())
    torch.testing.assert_close(logits.cpu(), x.double() @ w.double().t(), rtol=1e-4, atol=1e-4, check_dtype=False)
    ids_ref, w_ref = naive.route(x, w, bias, k, 2.446)
    ids, wts = route_tokens(x.cuda(), w.cuda(), bias.cuda(), k, 2.446)
    _same_selection(ids, wts, ids_ref, w_ref, rel=1e-4)
    graph = torch.cuda.CUDAGraph()  # capturable (kernels compiled above): the decode step is one graph
    xs, wd, bd = x.cuda(), w.cuda(), bias.cuda()
    with torch.cuda.graph(graph):
        ids_g, wts_g = route_tokens(xs, wd, bd, k, 2.446)
    graph.replay()
    torch.cuda.synchronize()
    _same_selection(ids_g, wts_g, ids_ref, w_ref, rel=1e-4)


def _norm_route_case(E, D, k, seed, dev):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(D, generator=g).to(torch.bfloat16)
    res = (3 * torch.randn(D, generator=g)).to(torch.bfloat16)
    nw = 1 + 0.2 * torch.randn(D, generator=g)
    w = 0.05 * torch.randn(E, D, generator=g)
    bias = 0.05 * torch.randn(E, generator=g)
    return [t.to(dev) for t in (v, res, nw, w, bias)]


def _check_norm_route(E, D, k, seed, dev, x8, BE=None, num_warps=None, rounds=2):
    """norm_router_route vs its two-launch form (norm.rms_norm with residual and x8, then naive.route on the
    stored h): residual updated identically, h within one bf16 rounding, x8 = quantize_x8 of the stored h,
    the reference's experts and weights; twice (the counter is re-armed)."""
    from kimi_local.kernels.norm import rms_norm
    from kimi_local.kernels.quant_matmul import quantize_x8, x8_words

    v, res, nw, w, bias = _norm_route_case(E, D, k, seed, dev)
    for r in range(rounds):
        res_ref = res.clone()
        h_ref = rms_norm(v, nw, 1e-5, residual=res_ref)
        h8 = torch.full((x8_words(D),), -7, dtype=torch.int32, device=dev) if x8 else None
        h = torch.full_like(v, float("nan"))
        got_h, ids, wts = norm_router_route(v, res, nw, 1e-5, w, bias, k, 2.446, h=h, x8_out=h8, BE=BE,
                                            num_warps=num_warps)
        assert got_h is h
        torch.testing.assert_close(res, res_ref, rtol=0, atol=0)
        torch.testing.assert_close(h.float(), h_ref.float(), rtol=8e-3, atol=1e-6)
        if x8:
            assert torch.equal(h8, quantize_x8(h))
        ids_ref, w_ref = naive.route(h.cpu()[None].float(), w.cpu(), bias.cpu(), k, 2.446)
        _same_selection(ids, wts, ids_ref, w_ref, rel=1e-4)
        assert int(router_mod._CNT[str(ids.device)].abs().sum()) == 0
        v = v.flip(0)


@pytest.mark.parametrize("E,D,k,BE,x8", [(37, 48, 3, 4, True), (16, 100, 4, 2, False), (64, 288, 8, None, True)])
def test_norm_router_route_matches_two_launches(E, D, k, BE, x8):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    _check_norm_route(E, D, k, E + D, dev, x8, BE=BE)


@pytest.mark.cuda
@pytest.mark.parametrize("num_warps", [None, 8])
def test_cuda_norm_router_route_real_shapes(num_warps):
    """256 experts x 2304, top-8, x8 output, and one CUDA graph replay of it."""
    _check_norm_route(256, 2304, 8, 5, "cuda", True, num_warps=num_warps)
    v, res, nw, w, bias = _norm_route_case(256, 2304, 8, 6, "cuda")
    res0 = res.clone()
    norm_router_route(v, res, nw, 1e-5, w, bias, 8, 2.446)  # compiled outside the capture
    res.copy_(res0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h, ids, wts = norm_router_route(v, res, nw, 1e-5, w, bias, 8, 2.446)
    graph.replay()
    torch.cuda.synchronize()
    ids_ref, w_ref = naive.route(h.cpu()[None].float(), w.cpu(), bias.cpu(), 8, 2.446)
    _same_selection(ids, wts, ids_ref, w_ref, rel=1e-4)
    torch.testing.assert_close(res, (res0.float() + v.float()).bfloat16(), rtol=0, atol=0)
