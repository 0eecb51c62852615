"""KDA Triton kernels (kernels/kda.py) and the norms (kernels/norm.py) vs the pure-torch references (kernels/naive.py).

CPU: tiny odd shapes under TRITON_INTERPRET=1 (K != V catches transposes). GPU (@cuda): real shapes,
CUDA-graph replay, and kda_prefill through fla-core's chunk_kda when fla is importable. The decode step with
its low-rank gates fused (fg_a, f_b, g_b) is checked against the unfused step fed with torch's f and z.
"""
import sys
import types
from pathlib import Path

import pytest
import torch

try:
    from kimi_local.kernels import kda, naive, norm
    from kimi_local.kernels.quant_matmul import quantize_x8, x8_words
except ImportError:  # not pip-installed (device machine): import the source dirs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import kda, naive, norm
    from kernels.quant_matmul import quantize_x8, x8_words

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _layer(H, K, V, W, gen, dev=DEV, tail_dtype=torch.float32):
    """Random per-layer parameters + conv tails, like the model's (a = -exp(A_log))."""
    r = lambda *s: torch.randn(*s, generator=gen).to(dev)  # noqa: E731
    conv_w = [r(H * K, W) * 0.5, r(H * K, W) * 0.5, r(H * V, W) * 0.5]
    tails = [r(H * K, W - 1).to(tail_dtype), r(H * K, W - 1).to(tail_dtype), r(H * V, W - 1).to(tail_dtype)]
    a = -torch.exp(r(H) * 0.5 - 1)
    return conv_w, tails, a, r(H * K), r(V) * 0.2 + 1


def _token(H, K, V, gen, dev=DEV, dtype=torch.float32):
    r = lambda *s: torch.randn(*s, generator=gen).to(dev).to(dtype)  # noqa: E731
    return r(H * K), r(H * K), r(H * V), r(H * K) * 2, r(H), r(H * V)  # q_raw k_raw v_raw f beta_logit z


def _graph_of(step, first, S, tails):
    """(CUDA graph of step(*bufs), bufs): input buffers holding `first`; one eager call before the capture
    (compile, workspace allocation) whose state and conv-tail updates are then undone."""
    bufs = [torch.empty_like(x) for x in first]
    for b, x in zip(bufs, first):
        b.copy_(x)
    s_save, t_save = S.clone(), [t.clone() for t in tails]
    step(*bufs)
    torch.cuda.synchronize()
    S.copy_(s_save)
    for t, s in zip(tails, t_save):
        t.copy_(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step(*bufs)
    return g, bufs


def _run_steps(H, K, V, W, n_steps, BV, in_dtype, tail_dtype, out_dtype, seed, dev=DEV, graph=False,
               num_warps=None, pdl=False, x8=False, cluster=None):
    """Max relative error of the outputs and of the final state vs the reference over n_steps tokens.
    x8: the kernel also writes the output's x8 buffer, which must equal quantize_x8 of the stored output."""
    gen = torch.Generator().manual_seed(seed)
    conv_w, tails, a, dt_bias, norm_w = _layer(H, K, V, W, gen, dev, tail_dtype)
    S0 = (torch.randn(H, K, V, generator=gen) * 0.3).to(dev)
    S_ref, S = S0.clone(), S0.clone()
    t_ref, t_k = [t.clone() for t in tails], [t.clone() for t in tails]
    toks = [_token(H, K, V, gen, dev, in_dtype) for _ in range(n_steps)]
    out = torch.empty(H * V, dtype=out_dtype, device=dev)
    out8 = torch.empty(x8_words(H * V), dtype=torch.int32, device=dev) if x8 else None
    if graph:
        g, bufs = _graph_of(lambda *b: kda.kda_decode_step(*b, conv_w, t_k, a, dt_bias, norm_w, S, out, 1e-5, BV=BV,
                                                           num_warps=num_warps, pdl=pdl, out8=out8, cluster=cluster),
                            toks[0], S, t_k)
    errs = []
    for tok in toks:
        ref = naive.kda_decode_ref(*tok, conv_w, t_ref, a, dt_bias, norm_w, S_ref, 1e-5)
        out.fill_(float("nan"))
        if x8:
            out8.fill_(-1)
        if graph:
            for b, x in zip(bufs, tok):
                b.copy_(x)
            g.replay()
        else:
            kda.kda_decode_step(*tok, conv_w, t_k, a, dt_bias, norm_w, S, out, 1e-5, BV=BV, num_warps=num_warps,
                                pdl=pdl, out8=out8, cluster=cluster)
        assert not out.isnan().any()
        if x8:
            assert torch.equal(out8, quantize_x8(out))
        errs.append(rel(out, ref))
    for t, tr in zip(t_k, t_ref):
        assert torch.equal(t, tr)  # tails are copies of raw inputs: exact
    return max(errs), rel(S, S_ref)


@pytest.mark.parametrize("BV", [None, 4, 8])  # None: DEFAULTS (one block here); 8: V=12 -> a full and a partial block
@pytest.mark.parametrize("H,K,V,W", [(3, 8, 12, 4), (2, 16, 8, 3)])
def test_decode_step_matches_reference(H, K, V, W, BV):
    e_out, e_state = _run_steps(H, K, V, W, 6, BV, torch.float32, torch.float32, torch.float32, seed=H * 7 + K)
    assert e_out < 1e-5 and e_state < 1e-5


def test_decode_step_bf16_io():
    # bf16 projections, bf16 tails and bf16 output (the GPU setting); the interpreter truncates fp32->bf16
    e_out, e_state = _run_steps(3, 8, 12, 4, 4, 4, torch.bfloat16, torch.bfloat16, torch.bfloat16, seed=3)  # 3 V blocks
    assert e_out < 1e-2 and e_state < 1e-5


@pytest.mark.parametrize("BV", [8, 16])  # 16 = V: one program per head (no workspace)
def test_decode_step_even_blocks_w2(BV):
    # V % BV == 0 and K == BK (the unmasked state path), W = 2 (a one-column tail)
    e_out, e_state = _run_steps(2, 8, 16, 2, 5, BV, torch.float32, torch.float32, torch.float32, seed=21)
    assert e_out < 1e-5 and e_state < 1e-5


@pytest.mark.parametrize("H,K,V,W,BV", [(2, 5, 7, 4, 4), (1, 16, 32, 3, 32), (4, 8, 8, 4, 2)])
def test_decode_step_odd_shapes(H, K, V, W, BV):
    # K, V not powers of two (masked rows and columns), one head, V = BV, many tiny V blocks
    e_out, e_state = _run_steps(H, K, V, W, 4, BV, torch.float32, torch.float32, torch.float32, seed=K * V)
    assert e_out < 1e-5 and e_state < 1e-5


@pytest.mark.parametrize("BV", [16, 4])  # 16 = V: the inline norm (NV = 1); 4: the last block's norm
def test_decode_step_x8_output(BV):
    # the output also as int8 activations for the o-projection (equal to quantize_x8 of the stored output)
    e_out, e_state = _run_steps(3, 8, 16, 4, 3, BV, torch.float32, torch.float32, torch.bfloat16, seed=31, x8=True)
    assert e_out < 1e-2 and e_state < 1e-5


def test_decode_step_rejects_wide_conv():
    with pytest.raises(ValueError, match="conv widths"):
        _run_steps(2, 8, 8, 5, 1, 4, torch.float32, torch.float32, torch.float32, seed=0)


def test_decode_step_defaults():
    assert kda.DEFAULTS == dict(BV=16, num_warps=1) and kda.FUSED_DEFAULTS == dict(BV=32, num_warps=4)


def test_decode_step_env_config(monkeypatch):
    # KIMI_LOCAL_KDA_CFG="BV,warps" replaces the defaults (A/B runs); results stay those of that BV
    monkeypatch.setenv("KIMI_LOCAL_KDA_CFG", "4,1")
    e_out, e_state = _run_steps(3, 8, 12, 4, 3, None, torch.float32, torch.float32, torch.float32, seed=8)
    assert e_out < 1e-5 and e_state < 1e-5
    monkeypatch.setenv("KIMI_LOCAL_KDA_CFG", "4")
    with pytest.raises(ValueError, match="KIMI_LOCAL_KDA_CFG"):
        _run_steps(3, 8, 12, 4, 1, None, torch.float32, torch.float32, torch.float32, seed=8)


def test_decode_step_counters_reset():
    _run_steps(3, 8, 12, 4, 3, 4, torch.float32, torch.float32, torch.float32, seed=5)
    ws_o, ws_cnt = kda._workspace(torch.empty(0, device=DEV).device, 3, 12)
    assert int(ws_cnt.abs().sum()) == 0


def test_cluster_launch_plumbing(monkeypatch):
    """The cluster path's host side: the load hook gives only a step kernel loaded inside a clustered launch its
    cluster width (cuFuncSetAttribute 11 / 12 / 13 = width, height, depth), a failing driver call raises, and
    cluster_enabled honours KIMI_LOCAL_KDA_CLUSTER and the interpreter / CPU."""
    carveout = kda._carveout

    calls = []

    class FakeLib:
        rc = 0

        def cuFuncSetAttribute(self, fn, attr, value):
            calls.append((fn.value, attr.value, value.value))
            return FakeLib.rc

    monkeypatch.setattr(carveout, "_LIB", FakeLib())
    monkeypatch.setattr(kda, "_CLUSTER_FUNCS", {})
    kda._on_load(None, 77, "kda_decode_step_kernel", None, None)  # not inside a clustered launch
    monkeypatch.setattr(kda, "_CLUSTER_PENDING", [4])
    kda._on_load(None, 77, "other_kernel", None, None)  # another kernel loaded meanwhile
    assert calls == []
    kda._on_load(None, 77, "kda_decode_step_kernel", None, None)
    assert calls == [(77, 11, 4), (77, 12, 1), (77, 13, 1)] and kda._CLUSTER_FUNCS == {77: 4}
    FakeLib.rc = 1
    with pytest.raises(RuntimeError, match="cluster 4 x 1 x 1"):
        kda._on_load(None, 78, "kda_decode_step_kernel", None, None)
    monkeypatch.setenv("KIMI_LOCAL_KDA_CLUSTER", "1")
    assert not kda.cluster_enabled("cpu")
    monkeypatch.setenv("KIMI_LOCAL_KDA_CLUSTER", "0")
    assert not kda.cluster_enabled("cuda")


def test_decode_step_cluster_launch_registers_hook_and_checks_width(monkeypatch):
    """cluster=True installs the load hook itself: a caller need not have asked cluster_enabled first (session 26's
    bench_kernels did not, so its cluster kernels loaded without a cluster width and ran as clusters of one CTA:
    garbage norms, and an illegal-instruction fault in the st.async exchange). A cluster kernel whose load did not
    record its width raises instead of computing garbage."""
    from triton import knobs
    assert kda._install_load_hook()
    assert kda._on_load in knobs.runtime.kernel_load_end_hook.calls
    launched, hooks = [], []

    class FakeKernel:  # kda_decode_step_kernel[grid](...) -> the launched kernel's handle
        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append((grid, kw["CLUSTER"], kda._CLUSTER_PENDING[0])) or \
                types.SimpleNamespace(function=123)

    monkeypatch.setattr(kda, "kda_decode_step_kernel", FakeKernel())
    monkeypatch.setattr(kda, "_INTERP", False)
    monkeypatch.setattr(kda, "_CLUSTER_FUNCS", {})
    monkeypatch.setattr(kda, "_install_load_hook", lambda: hooks.append(1) or True)
    gen = torch.Generator().manual_seed(3)
    conv_w, tails, a, dt_bias, norm_w = _layer(3, 8, 12, 4, gen)
    S, out, tok = torch.randn(3, 8, 12, generator=gen), torch.empty(3 * 12), _token(3, 8, 12, gen)
    step = lambda: kda.kda_decode_step(*tok, conv_w, tails, a, dt_bias, norm_w, S, out, 1e-5, BV=4,  # noqa: E731
                                       cluster=True, pdl=False)
    with pytest.raises(RuntimeError, match="without its cluster width"):
        step()
    assert hooks == [1] and launched == [((3, 3), True, 3)] and kda._CLUSTER_PENDING[0] == 0
    kda._CLUSTER_FUNCS[123] = 3  # what _on_load records when the kernel loads inside the launch
    step()
    assert len(launched) == 2


def test_decode_step_cluster_request_falls_back():
    """cluster=True where clusters cannot run (the interpreter, or blocks that do not tile [K, V]) takes the arrival
    path: the same bits as cluster=False, and the pending width is cleared after the launch."""
    outs = []
    for cl in (True, False):
        gen = torch.Generator().manual_seed(3)
        conv_w, tails, a, dt_bias, norm_w = _layer(3, 8, 12, 4, gen)
        S = torch.randn(3, 8, 12, generator=gen).to(DEV)
        out = torch.empty(3 * 12, device=DEV)
        kda.kda_decode_step(*_token(3, 8, 12, gen), conv_w, tails, a, dt_bias, norm_w, S, out, 1e-5, BV=4, cluster=cl)
        outs.append((out, S))
        assert kda._CLUSTER_PENDING[0] == 0
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ---- fused low-rank gates: f = f_b f_a(h), z = g_b g_a(h) inside the step (fg_a, f_b, g_b) -----------------
def _as_stored(x, dtype):
    """fp32 x rounded to dtype as the kernel's cast does: round to nearest on a GPU, truncation under the
    interpreter (bf16), so that fused and unfused steps see the same f and z up to accumulation order."""
    if dtype == torch.bfloat16 and DEV == "cpu":
        return (x.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return x.to(dtype)


def _run_fused_steps(H, K, V, W, RF, RG, n_steps, BV, in_dtype, out_dtype, seed, dev=DEV, graph=False,
                     num_warps=None, pdl=False, x8=False, rank_chunk=None, cluster=None):
    """The fused step (fg_a, f_b, g_b) vs the unfused one fed with f = f_b f_a and z = g_b g_a computed in torch
    (rounded to in_dtype as the kernel rounds them), from the same state and tails, over n_steps tokens: max
    relative error of the outputs and relative error of the final state (tails: equal). x8: both write the
    output's x8 buffer; the fused one must equal quantize_x8 of its stored output. graph: the fused step is
    replayed from a CUDA graph."""
    gen = torch.Generator().manual_seed(seed)
    conv_w, tails, a, dt_bias, norm_w = _layer(H, K, V, W, gen, dev, in_dtype)
    # bf16 weights as the engine holds them; f ~ 2 N(0, 1) (as _token's), z ~ N(0, 1)
    f_b = (torch.randn(H * K, RF, generator=gen) * 2 * RF**-0.5).to(dev, torch.bfloat16)
    g_b = (torch.randn(H * V, RG, generator=gen) * RG**-0.5).to(dev, torch.bfloat16)
    S0 = (torch.randn(H, K, V, generator=gen) * 0.3).to(dev)
    S_u, S_f = S0.clone(), S0.clone()
    t_u, t_f = [t.clone() for t in tails], [t.clone() for t in tails]
    r = lambda n: torch.randn(n, generator=gen).to(dev).to(in_dtype)  # noqa: E731
    toks = [(r(H * K), r(H * K), r(H * V), r(H), r(RF + RG)) for _ in range(n_steps)]  # q k v beta fg_a
    out_u, out_f = (torch.empty(H * V, dtype=out_dtype, device=dev) for _ in range(2))
    o8_u, o8_f = (torch.empty(x8_words(H * V), dtype=torch.int32, device=dev) if x8 else None for _ in range(2))
    kw = dict(BV=BV, num_warps=num_warps, pdl=pdl, cluster=cluster)

    def fused(q, k, v, beta, fg):
        kda.kda_decode_step(q, k, v, None, beta, None, conv_w, t_f, a, dt_bias, norm_w, S_f, out_f, 1e-5, out8=o8_f,
                            fg_a=fg, f_b=f_b, g_b=g_b, rank_chunk=rank_chunk, **kw)

    if graph:
        g, bufs = _graph_of(fused, toks[0], S_f, t_f)
    errs = []
    for q, k, v, beta, fg in toks:
        f = _as_stored(f_b.float() @ fg[:RF].float(), in_dtype)
        z = _as_stored(g_b.float() @ fg[RF:].float(), in_dtype)
        for o, o8 in ((out_u, o8_u), (out_f, o8_f)):
            o.fill_(float("nan"))
            if x8:
                o8.fill_(-1)
        kda.kda_decode_step(q, k, v, f, beta, z, conv_w, t_u, a, dt_bias, norm_w, S_u, out_u, 1e-5, out8=o8_u, **kw)
        if graph:
            for b, x in zip(bufs, (q, k, v, beta, fg)):
                b.copy_(x)
            g.replay()
        else:
            fused(q, k, v, beta, fg)
        assert not out_f.isnan().any() and not out_u.isnan().any()
        if x8:
            assert torch.equal(o8_f, quantize_x8(out_f))
        errs.append(rel(out_f, out_u))
    for t, tu in zip(t_f, t_u):
        assert torch.equal(t, tu)  # tails are copies of raw inputs: exact
    return max(errs), rel(S_f, S_u)


@pytest.mark.parametrize("rank_chunk", [None, 4])  # None: one chunk at these sizes; 4: several, the last partial
@pytest.mark.parametrize("H,K,V,W,RF,RG,BV", [
    (3, 8, 12, 4, 16, 8, 4),  # NV = 3, RF != RG
    (2, 5, 7, 3, 6, 10, 4),  # K, V and the ranks not powers of two, a partial V block
    (2, 16, 8, 4, 12, 20, None),  # NV = 1 (BV = V): z of the whole head in the one program
    (1, 8, 16, 2, 8, 8, 16),  # NV = 1, even blocks (unmasked state), W = 2
])
def test_fused_gates_match_unfused(H, K, V, W, RF, RG, BV, rank_chunk):
    e_out, e_state = _run_fused_steps(H, K, V, W, RF, RG, 4, BV, torch.float32, torch.float32, seed=K * V + RF,
                                      rank_chunk=rank_chunk)
    assert e_out < 1e-5 and e_state < 1e-5


@pytest.mark.parametrize("H,K,V,W,RF,RG,BV", [(3, 8, 12, 4, 16, 8, 4), (2, 5, 7, 3, 6, 10, 8)])
def test_fused_gates_bf16_io(H, K, V, W, RF, RG, BV):
    # bf16 projections (fg_a), tails and output: f and z rounded to bf16 in the kernel as the GEMV would
    e_out, e_state = _run_fused_steps(H, K, V, W, RF, RG, 4, BV, torch.bfloat16, torch.bfloat16, seed=5 + K,
                                      rank_chunk=4)
    assert e_out < 1e-3 and e_state < 1e-4


@pytest.mark.parametrize("BV", [16, 4])  # 16 = V: the inline norm (NV = 1); 4: the last block's norm from ws_z
def test_fused_gates_x8_output(BV):
    e_out, e_state = _run_fused_steps(3, 8, 16, 4, 12, 8, 3, BV, torch.bfloat16, torch.bfloat16, seed=41, x8=True)
    assert e_out < 1e-3 and e_state < 1e-4


def test_fused_gates_argument_checks():
    H, K, V, W = 2, 8, 8, 4
    gen = torch.Generator().manual_seed(0)
    conv_w, tails, a, dt_bias, norm_w = _layer(H, K, V, W, gen)
    q, k, v, f, beta, z = _token(H, K, V, gen)
    S, out = torch.zeros(H, K, V, device=DEV), torch.empty(H * V, device=DEV)
    f_b, g_b, fg = torch.zeros(H * K, 4, device=DEV), torch.zeros(H * V, 4, device=DEV), torch.zeros(8, device=DEV)
    with pytest.raises(AssertionError, match="fg_a replaces f and z"):
        kda.kda_decode_step(q, k, v, f, beta, None, conv_w, tails, a, dt_bias, norm_w, S, out, fg_a=fg, f_b=f_b,
                            g_b=g_b)
    with pytest.raises(AssertionError):  # g_b without fg_a
        kda.kda_decode_step(q, k, v, f, beta, z, conv_w, tails, a, dt_bias, norm_w, S, out, g_b=g_b)
    with pytest.raises(AssertionError):  # fg_a shorter than RF + RG
        kda.kda_decode_step(q, k, v, None, beta, None, conv_w, tails, a, dt_bias, norm_w, S, out, fg_a=fg[:7], f_b=f_b,
                            g_b=g_b)


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 17, 33, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv_prefill(T, dtype):
    gen = torch.Generator().manual_seed(T)
    C, W = 20, 4  # C not a power of two
    x = torch.randn(T, C, generator=gen).to(dtype).to(DEV)
    w = torch.randn(C, W, generator=gen).to(DEV)
    tail = torch.randn(C, W - 1, generator=gen).to(dtype).to(DEV)
    y_ref, t_ref = naive.short_conv(x, w, tail)
    out = torch.full((T, C), float("nan"), device=DEV)
    t = tail.clone()
    kda.causal_conv_prefill(x, w, t, out)
    assert (out - y_ref).abs().max().item() < 1e-5
    assert torch.equal(t, t_ref)


def test_causal_conv_split_equals_one_shot():
    # prefill in pieces (incl. pieces shorter than W-1) == one prefill; then decode-style tail continues
    gen = torch.Generator().manual_seed(1)
    C, W, T = 12, 4, 40
    x = torch.randn(T, C, generator=gen).to(DEV)
    w = torch.randn(C, W, generator=gen).to(DEV)
    y_ref, t_ref = naive.short_conv(x, w, None)
    t = torch.zeros(C, W - 1, device=DEV)
    outs = []
    for a, b in [(0, 1), (1, 3), (3, 20), (20, 22), (22, 40)]:
        outs.append(kda.causal_conv_prefill(x[a:b], w, t))
    assert (torch.cat(outs) - y_ref).abs().max().item() < 1e-5
    assert torch.equal(t, t_ref)


def test_causal_conv_strided_rows():
    # q|k|v packed in one projection output: x is a column slice with row stride 3C
    gen = torch.Generator().manual_seed(2)
    C, W, T = 10, 4, 9
    qkv = torch.randn(T, 3 * C, generator=gen).to(DEV)
    x = qkv[:, C:2 * C]
    w = torch.randn(C, W, generator=gen).to(DEV)
    y_ref, t_ref = naive.short_conv(x, w, None)
    t = torch.zeros(C, W - 1, device=DEV)
    assert (kda.causal_conv_prefill(x, w, t) - y_ref).abs().max().item() < 1e-5
    assert torch.equal(t, t_ref)


def _kda_inputs(T, H, K, V, gen, dev=DEV, strong=False):
    q = naive.l2norm(torch.randn(T, H, K, generator=gen)).to(dev)
    k = naive.l2norm(torch.randn(T, H, K, generator=gen)).to(dev)
    v = torch.randn(T, H, V, generator=gen).to(dev)
    g = (-(20.0 if strong else 1.0) * torch.rand(T, H, K, generator=gen) ** 2).to(dev)
    beta = torch.sigmoid(torch.randn(T, H, generator=gen)).to(dev)
    return q, k, v, g, beta


@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_kda_prefill_fallback(T, with_state):
    gen = torch.Generator().manual_seed(T)
    H, K, V = 2, 8, 12
    q, k, v, g, beta = _kda_inputs(T, H, K, V, gen, "cpu", strong=T == 65)
    s0 = torch.randn(H, K, V, generator=gen) if with_state else None
    o_ref, s_ref = naive.kda_recurrent(q, k, v, g, beta, s0)
    state = s0.clone() if with_state else None
    o, s = kda.kda_prefill(q, k, v, g, beta, state, use_fla=False)
    assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5
    if with_state:
        assert s is state


def test_prefill_then_decode_equals_recurrence():
    """Kernels end to end: conv prefill + kda_prefill for 5 tokens, then 3 decode steps == naive on 8."""
    H, K, V, W, T0, T1 = 2, 8, 12, 4, 5, 3
    gen = torch.Generator().manual_seed(11)
    conv_w, _, a, dt_bias, norm_w = _layer(H, K, V, W, gen)
    toks = [_token(H, K, V, gen) for _ in range(T0 + T1)]
    cols = [torch.stack([t[i] for t in toks]) for i in range(6)]  # [T, .] each
    # reference over all tokens
    ys = [naive.short_conv(cols[i], conv_w[i], None)[0] for i in range(3)]
    q, k = naive.l2norm(ys[0].view(-1, H, K)), naive.l2norm(ys[1].view(-1, H, K))
    g = naive.kda_gate(cols[3].view(-1, H, K), a, dt_bias.view(H, K))
    o, _ = naive.kda_recurrent(q, k, ys[2].view(-1, H, V), g, torch.sigmoid(cols[4]), None)
    ref = naive.gated_rms_norm(o, cols[5].view(-1, H, V), norm_w, 1e-5).reshape(-1, H * V)
    # kernels: prefill T0 tokens, then decode
    tails = [torch.zeros(cw.shape[0], W - 1, device=DEV) for cw in conv_w]
    ys = [kda.causal_conv_prefill(cols[i][:T0], conv_w[i], tails[i]) for i in range(3)]
    q, k = naive.l2norm(ys[0].view(-1, H, K)), naive.l2norm(ys[1].view(-1, H, K))
    g = naive.kda_gate(cols[3][:T0].view(-1, H, K), a, dt_bias.view(H, K))
    state = torch.zeros(H, K, V, device=DEV)
    o, _ = kda.kda_prefill(q, k, ys[2].view(-1, H, V), g, torch.sigmoid(cols[4][:T0]), state, use_fla=False)
    got = [naive.gated_rms_norm(o, cols[5][:T0].view(-1, H, V), norm_w, 1e-5).reshape(-1, H * V)]
    for t in range(T0, T0 + T1):
        out = torch.full((H * V,), float("nan"), device=DEV)
        kda.kda_decode_step(*toks[t], conv_w, tails, a, dt_bias, norm_w, state, out, 1e-5, BV=4)
        got.append(out[None])
    assert rel(torch.cat(got), ref) < 1e-5


def test_kda_recurrent_vs_fla_naive():
    """External oracle for the reference the kernels are tested against."""
    fla_naive = pytest.importorskip("fla.ops.kda.naive")
    gen = torch.Generator().manual_seed(4)
    T, H, K, V = 9, 2, 8, 12
    q, k, v, g, beta = _kda_inputs(T, H, K, V, gen, "cpu", strong=True)
    s0 = torch.randn(H, K, V, generator=gen)
    o_ref, s_ref = fla_naive.naive_recurrent_kda(q[None], k[None], v[None], g[None], beta[None],
                                                 initial_state=s0[None], output_final_state=True)
    o, s = naive.kda_recurrent(q, k, v, g, beta, s0)
    assert rel(o, o_ref[0]) < 1e-5 and rel(s, s_ref[0]) < 1e-5


# ---- norms (kernels/norm.py) -----------------------------------------------------------------
def _ulp_ok(got, ref, ulps):
    """|got - ref| within `ulps` bf16 ulps of ref (the interpreter truncates fp32->bf16; a GPU rounds)."""
    return bool(((got.float() - ref.float()).abs() <= ref.float().abs() * ulps * 2**-7 + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,D", [(1, 40), (3, 37), (5, 64)])
def test_rms_norm(dtype, T, D):
    gen = torch.Generator().manual_seed(D)
    x = (torch.randn(T, D, generator=gen) * 3).to(dtype).to(DEV)
    w = (torch.rand(D, generator=gen) + 0.5).to(DEV)
    out = torch.full((T, D), float("nan"), device=DEV).to(dtype)
    norm.rms_norm(x, w, 1e-5, out)
    ref = naive.rms_norm(x, w, 1e-5)
    assert _ulp_ok(out, ref, 3 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_residual(dtype):
    gen = torch.Generator().manual_seed(7)
    T, D = 3, 45
    x = torch.randn(T, D, generator=gen).to(dtype).to(DEV)
    r = torch.randn(T, D, generator=gen).to(dtype).to(DEV)
    w = (torch.rand(D, generator=gen) + 0.5).to(DEV)
    h_ref = x + r
    ref = naive.rms_norm(h_ref, w, 1e-5)
    r_in = r.clone()
    out = norm.rms_norm(x, w, 1e-5, residual=r_in)  # residual updated in place to x + residual
    assert _ulp_ok(r_in, h_ref, 1 if dtype == torch.bfloat16 else 1e-4)
    assert _ulp_ok(out, ref, 4 if dtype == torch.bfloat16 else 1e-3)
    x1 = x[0]  # a single token, [D]
    ro = torch.empty(D, device=DEV, dtype=dtype)
    out1 = norm.rms_norm(x1, w, 1e-5, residual=r[0], residual_out=ro)
    assert out1.shape == (D,) and _ulp_ok(out1, ref[0], 4 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [48, 2304])
def test_rms_norm_x8_out(dtype, D):
    """The norm's int8-activation output equals quantize_x8 of the values it stored (both on this device)."""
    from test_quant_matmul import qm

    gen = torch.Generator().manual_seed(D)
    x = (torch.randn(1, D, generator=gen) * 3).to(dtype).to(DEV)
    r = torch.randn(1, D, generator=gen).to(dtype).to(DEV)
    w = (torch.rand(D, generator=gen) + 0.5).to(DEV)
    x8 = torch.full((qm.x8_words(D),), -1, dtype=torch.int32, device=DEV)
    out = norm.rms_norm(x, w, 1e-5, residual=r, x8_out=x8)
    assert torch.equal(x8, qm.quantize_x8(out[0]))


@pytest.mark.parametrize("H,V", [(3, 12), (2, 5)])
def test_gated_rms_norm(H, V):
    gen = torch.Generator().manual_seed(V)
    T = 6
    o = torch.randn(T, H, V, generator=gen).to(DEV)
    z = torch.randn(T, H * V, generator=gen).to(DEV)
    w = (torch.rand(V, generator=gen) + 0.5).to(DEV)
    ref = naive.gated_rms_norm(o, z.view(T, H, V), w, 1e-5)
    out = torch.full((T, H, V), float("nan"), device=DEV)
    norm.gated_rms_norm(o, z, w, 1e-5, out)
    assert rel(out, ref) < 1e-5


# ---- GPU, real shapes ------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("BV", [8, 16, 32, 64, 128])
def test_decode_step_real_shapes(BV, pdl):
    e_out, e_state = _run_steps(32, 128, 128, 4, 20, BV, torch.bfloat16, torch.bfloat16, torch.float32, seed=BV,
                                pdl=pdl)
    assert e_out < 1e-4 and e_state < 1e-4
    e_out, _ = _run_steps(32, 128, 128, 4, 5, BV, torch.bfloat16, torch.bfloat16, torch.bfloat16, seed=BV + 1,
                          pdl=pdl)
    assert e_out < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("BV,pdl,x8", [(None, False, False), (None, True, False), (32, False, False),
                                      (128, False, False), (128, True, False), (None, True, True), (128, True, True)])
def test_decode_step_cuda_graph(BV, pdl, x8):
    e_out, e_state = _run_steps(32, 128, 128, 4, 20, BV, torch.bfloat16, torch.bfloat16, torch.bfloat16 if x8 else torch.float32,
                                seed=9, graph=True, pdl=pdl, x8=x8)
    assert e_out < (1e-2 if x8 else 1e-4) and e_state < 1e-4  # x8: a bf16 output


@pytest.mark.cuda
@pytest.mark.parametrize("BV,num_warps,pdl", [(None, None, False), (None, None, True), (16, 2, False), (8, 1, False),
                                              (8, 1, True), (32, 4, False), (128, 8, False)])
def test_decode_step_long_horizon(BV, num_warps, pdl):
    # 500 steps, K != V, many V blocks: drift or a racy cross-block norm shows up here
    e_out, e_state = _run_steps(32, 128, 96, 4, 500, BV, torch.float32, torch.float32, torch.float32, seed=13,
                                num_warps=num_warps, pdl=pdl)
    assert e_out < 1e-4 and e_state < 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("BV,rank_chunk", [(None, None), (None, 64), (8, None), (32, None), (128, None), (128, 32)])
def test_fused_gates_real_shapes(BV, rank_chunk, pdl):
    # Kimi-Linear shapes (H=32, K=V=128, ranks 128, W=4), bf16 projections: fused == unfused up to the fp32
    # accumulation order of f and z (a rare 1-ulp flip of their bf16 rounding)
    e_out, e_state = _run_fused_steps(32, 128, 128, 4, 128, 128, 20, BV, torch.bfloat16, torch.float32, seed=BV or 0,
                                      pdl=pdl, rank_chunk=rank_chunk)
    assert e_out < 1e-3 and e_state < 1e-3
    e_out, _ = _run_fused_steps(32, 128, 128, 4, 128, 128, 5, BV, torch.bfloat16, torch.bfloat16, seed=7, pdl=pdl,
                                rank_chunk=rank_chunk)
    assert e_out < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("BV,pdl,x8", [(None, False, False), (None, True, False), (None, True, True),
                                      (128, False, False), (128, True, True)])
def test_fused_gates_cuda_graph(BV, pdl, x8):
    e_out, e_state = _run_fused_steps(32, 128, 128, 4, 128, 128, 20, BV, torch.bfloat16,
                                      torch.bfloat16 if x8 else torch.float32, seed=17, graph=True, pdl=pdl, x8=x8)
    assert e_out < (1e-2 if x8 else 1e-3) and e_state < 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("BV,num_warps", [(None, None), (16, 2), (8, 1), (32, 4)])
def test_fused_gates_long_horizon(BV, num_warps):
    # 300 fp32 steps, K != V (96): a racy ws_z hand-over or a wrong row of f_b / g_b shows up here
    e_out, e_state = _run_fused_steps(32, 128, 96, 4, 128, 128, 300, BV, torch.float32, torch.float32, seed=23,
                                      num_warps=num_warps, pdl=True)
    assert e_out < 1e-4 and e_state < 1e-4


def _cluster_pair(H, K, V, n_steps, BV, num_warps, pdl, x8, fused, graph, seed):
    """The same tokens through two copies of a layer, the step with cluster=True and with cluster=False (the arrival
    counter): conv tails must stay bit-equal, states too unfused (the norm is not on their path), outputs equal up
    to the order of the norm's sum, and each x8 buffer equal to quantize_x8 of its stored output. Returns the max
    relative difference of the outputs."""
    gen = torch.Generator().manual_seed(seed)
    conv_w, tails, a, dt_bias, norm_w = _layer(H, K, V, 4, gen, DEV, torch.bfloat16)
    f_b = (torch.randn(H * K, 128, generator=gen) * 2 / 128**0.5).to(DEV, torch.bfloat16)
    g_b = (torch.randn(H * V, 128, generator=gen) / 128**0.5).to(DEV, torch.bfloat16)
    S0 = (torch.randn(H, K, V, generator=gen) * 0.3).to(DEV)
    r = lambda n: torch.randn(n, generator=gen).to(DEV).to(torch.bfloat16)  # noqa: E731
    toks = [(r(H * K), r(H * K), r(H * V), r(H * K) * 2, r(H), r(H * V), r(256)) for _ in range(n_steps)]
    runs = []
    for cl in (True, False):
        S, t = S0.clone(), [x.clone() for x in tails]
        out = torch.empty(H * V, dtype=torch.bfloat16 if x8 else torch.float32, device=DEV)
        o8 = torch.empty(x8_words(H * V), dtype=torch.int32, device=DEV) if x8 else None

        def step(q, k, v, f, beta, z, fg, S=S, t=t, out=out, o8=o8, cl=cl):
            if fused:
                kda.kda_decode_step(q, k, v, None, beta, None, conv_w, t, a, dt_bias, norm_w, S, out, 1e-5, BV=BV,
                                    num_warps=num_warps, pdl=pdl, out8=o8, fg_a=fg, f_b=f_b, g_b=g_b, cluster=cl)
            else:
                kda.kda_decode_step(q, k, v, f, beta, z, conv_w, t, a, dt_bias, norm_w, S, out, 1e-5, BV=BV,
                                    num_warps=num_warps, pdl=pdl, out8=o8, cluster=cl)

        if graph:
            g, bufs = _graph_of(step, toks[0], S, t)
        outs = []
        for tok in toks:
            out.fill_(float("nan"))
            if graph:
                for b, x in zip(bufs, tok):
                    b.copy_(x)
                g.replay()
            else:
                step(*tok)
            assert not out.isnan().any()
            if x8:
                assert torch.equal(o8, quantize_x8(out))
            outs.append(out.clone())
        runs.append((S, t, outs))
    (S1, t1, o1), (S2, t2, o2) = runs
    if fused:  # the cluster's f rows are summed in one rank chunk (FSPLIT): a rare 1-ulp flip of f's bf16 rounding
        assert rel(S1, S2) < 1e-3
    else:
        assert torch.equal(S1, S2)
    for x, y in zip(t1, t2):
        assert torch.equal(x, y)
    return max(rel(x, y) for x, y in zip(o1, o2))


@pytest.mark.cuda
@pytest.mark.parametrize("V,BV,num_warps", [(128, 16, 1), (128, 32, 4), (128, 64, 4), (96, 32, 4), (96, 16, 2)])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("pdl,x8,graph", [(False, False, False), (True, False, True), (True, True, True)])
def test_decode_step_cluster_equals_arrival(V, BV, num_warps, fused, pdl, x8, graph):
    # clusters of 8, 4, 2, 3 and 6 CTAs (fused: f split over the cluster at 8, 4, 2; whole in every block at 3, 6);
    # 50 steps, so a wrong exchange (a stale or missing partial) shows
    assert kda.cluster_enabled(DEV)
    d = _cluster_pair(32, 128, V, 50, BV, num_warps, pdl, x8, fused, graph, seed=V + BV)
    assert d < (1e-2 if x8 else 1e-3 if fused else 1e-5)  # x8: bf16 outputs, a rare 1-ulp flip


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True])
def test_decode_step_cluster_barrier_exchange(fused, monkeypatch):
    # KIMI_LOCAL_KDA_NBAR=0: both exchanges through cluster barriers instead of st.async + mbarriers
    monkeypatch.setenv("KIMI_LOCAL_KDA_NBAR", "0")
    d = _cluster_pair(32, 128, 128, 50, 32, 4, True, True, fused, True, seed=5)
    assert d < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 2, 3, 100, 8192])
def test_causal_conv_prefill_real_shapes(T):
    gen = torch.Generator().manual_seed(T)
    C, W = 4096, 4
    x = torch.randn(T, C, generator=gen).to(torch.bfloat16).cuda()
    w = torch.randn(C, W, generator=gen).cuda()
    tail = torch.randn(C, W - 1, generator=gen).to(torch.bfloat16).cuda()
    y_ref, t_ref = naive.short_conv(x, w, tail)
    t = tail.clone()
    out = torch.full((T, C), float("nan"), dtype=torch.bfloat16, device="cuda")
    kda.causal_conv_prefill(x, w, t, out)
    assert rel(out, y_ref) < 1e-2
    assert torch.equal(t, t_ref)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000, 8192])
@pytest.mark.parametrize("with_state", [False, True])
def test_kda_prefill_fla(T, with_state):
    pytest.importorskip("fla.ops.kda")
    gen = torch.Generator().manual_seed(T)
    H, K, V = 32, 128, 128
    q, k, v, g, beta = _kda_inputs(T, H, K, V, gen, "cuda", strong=T == 1000)
    s0 = (torch.randn(H, K, V, generator=gen) * 0.3).cuda() if with_state else None
    o_ref, s_ref = naive.kda_chunked(q, k, v, g, beta, s0)
    state = s0.clone() if with_state else None
    bf = torch.bfloat16
    o, s = kda.kda_prefill(q.to(bf), k.to(bf), v.to(bf), g, beta, state, use_fla=True)
    assert not o.isnan().any()
    assert rel(o, o_ref) < 2e-2 and rel(s, s_ref) < 2e-2
    if with_state:
        assert s is state


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 7, 4096])
def test_norms_real_shapes(T):
    gen = torch.Generator().manual_seed(T)
    D, H, V = 2304, 32, 128
    x = torch.randn(T, D, generator=gen).to(torch.bfloat16).cuda()
    r = torch.randn(T, D, generator=gen).to(torch.bfloat16).cuda()
    w = (torch.rand(D, generator=gen) + 0.5).to(torch.bfloat16).cuda()
    r_in = r.clone()
    out = norm.rms_norm(x, w, 1e-5, residual=r_in)
    assert torch.equal(r_in, x + r)
    # the sum of squares reduces in another order than torch's, which can flip the bf16 rounding of
    # the normalised value; times w (rounded again) that is at most 2 ulps (seen on an H100 at T=4096)
    assert _ulp_ok(out, naive.rms_norm(x + r, w, 1e-5), 2)
    o = torch.randn(T, H, V, generator=gen).cuda()
    z = torch.randn(T, H, V, generator=gen).to(torch.bfloat16).cuda()
    wv = (torch.rand(V, generator=gen) + 0.5).cuda()
    out = norm.gated_rms_norm(o, z, wv, 1e-5, torch.empty(T, H, V, dtype=torch.bfloat16, device="cuda"))
    assert rel(out, naive.gated_rms_norm(o, z, wv, 1e-5)) < 1e-2
