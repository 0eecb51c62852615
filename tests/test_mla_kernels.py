"""MLA decode kernels (kernels/mla.py) vs the pure-torch references (kernels/naive.py).

CPU: tiny shapes under TRITON_INTERPRET=1; GPU (@cuda): 32 heads, latent 512 + 64, up to 128K rows,
bf16 and fp8, CUDA-graph replay at growing lengths. The decode step's fused launches (mla_absorb_write:
cache write + q_abs = W_UK^T q_nope; mla_decode with v_b: combine + o = W_UV ctx + o's x8 groups) are
checked against the launches they replace (mla_cache_write, torch.bmm, combine, quantize_x8).
"""
import math

import sys
from pathlib import Path

import pytest
import torch

try:
    from kimi_local.kernels import mla, naive, pdl
    from kimi_local.kernels.quant_matmul import dequantize_x8, quantize_x8, x8_words
except ImportError:  # not pip-installed (device machine): import the source dirs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import mla, naive, pdl
    from kernels.quant_matmul import dequantize_x8, quantize_x8, x8_words

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
# rms_norm in bf16 rounds three times (weight, normalised x, product); the interpreter truncates each
# (<= 1 ulp = 2^-7 relative), a GPU rounds (<= 1/2 ulp)
BF16_TOL = 3 * 2**-7 if DEV == "cpu" else 2 * 2**-7
# the interpreter upcasts dot operands to fp32; a GPU feeds bf16 to the tensor cores (q and p rounded)
BF16_DOT_TOL = 1e-5 if DEV == "cpu" else 1e-2


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _dequant(lat, sc):
    return lat.float() * sc[:, None] if lat.dtype == FP8 else lat.float()


def _attend(q_abs, q_pe, lat, sc, n, scale):
    full = _dequant(lat[:n], None if sc is None else sc[:n])
    R = q_abs.shape[1]
    return naive.mla_latent_attend(q_abs, q_pe, full[:, :R], full[:, R:], scale)


@pytest.mark.parametrize("n", [1, 16, 17, 100, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("len_tensor", [False, True])
def test_mla_decode_matches_reference(n, dtype, len_tensor):
    gen = torch.Generator().manual_seed(n)
    H, R, DR, cap = 5, 32, 16, 300
    lat = torch.randn(cap, R + DR, generator=gen).to(dtype).to(DEV)
    lat[n:] = float("nan")  # rows past seq_len must never be read into the result
    q_abs, q_pe = torch.randn(H, R, generator=gen).to(DEV), torch.randn(H, DR, generator=gen).to(DEV)
    ref = _attend(q_abs, q_pe, lat, None, n, 0.3)
    out = torch.full((H, R), float("nan"), device=DEV)
    seq = torch.tensor([n], dtype=torch.int32, device=DEV) if len_tensor else n
    mla.mla_decode(q_abs, q_pe, lat, seq, 0.3, out, num_splits=4, min_chunk=16, BS=16)
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else BF16_DOT_TOL)


@pytest.mark.parametrize("min_chunk,splits,bn", [(16, 3, None), (64, 8, None), (16, 16, None), (16, 9, "2"),
                                                  (16, 9, "4")])
@pytest.mark.parametrize("onepass", ["1", "0"])
def test_mla_decode_split_shapes(min_chunk, splits, bn, onepass, monkeypatch):
    """bn: KIMI_LOCAL_MLA_COMBINE_BN, splits merged per combine step (9 splits in steps of 2 or 4: a partial last
    step; the default merges all of them in one); onepass: KIMI_LOCAL_MLA_COMBINE_ONEPASS (the running maximum, or
    a first pass for it)."""
    monkeypatch.setenv("KIMI_LOCAL_MLA_COMBINE_ONEPASS", onepass)
    if bn:
        monkeypatch.setenv("KIMI_LOCAL_MLA_COMBINE_BN", bn)
    gen = torch.Generator().manual_seed(splits)
    H, R, DR, n = 3, 16, 8, 150  # DR < 16: padded key part
    lat = torch.randn(n, R + DR, generator=gen).to(DEV)
    q_abs, q_pe = torch.randn(H, R, generator=gen).to(DEV), torch.randn(H, DR, generator=gen).to(DEV)
    out = mla.mla_decode(q_abs, q_pe, lat, n, 0.25, num_splits=splits, min_chunk=min_chunk, BS=16)
    assert rel(out, _attend(q_abs, q_pe, lat, None, n, 0.25)) < 1e-5


@pytest.mark.parametrize("variant", ["t", "hm"])
def test_mla_decode_strided_q_pe_bf16_out(variant):
    """q_pe as a slice of the q projection (rows strided by Dn + Dr, the engine passes it without a
    copy) and a bf16 out (no cast kernel): same result as contiguous q_pe into fp32 out."""
    gen = torch.Generator().manual_seed(7)
    H, R, DN, DR, n = 5, 32, 24, 16, 70
    lat = torch.randn(n, R + DR, generator=gen).to(torch.bfloat16).to(DEV)
    q = torch.randn(H, DN + DR, generator=gen).to(torch.bfloat16).to(DEV)
    q_abs = torch.randn(H, R, generator=gen).to(torch.bfloat16).to(DEV)
    ref = mla.mla_decode(q_abs, q[:, DN:].contiguous(), lat, n, 0.3, num_splits=4, min_chunk=16, BS=16, variant=variant)
    out = torch.empty(H, R, dtype=torch.bfloat16, device=DEV)
    got = mla.mla_decode(q_abs, q[:, DN:], lat, n, 0.3, out, num_splits=4, min_chunk=16, BS=16, variant=variant)
    assert got is out
    # 1 bf16 ulp: the interpreter's fp32 -> bf16 conversion truncates, the GPU's rounds to nearest
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-6)
    assert rel(out, _attend(q_abs.float(), q[:, DN:].float(), lat, None, n, 0.3)) < 1e-2  # bf16 output


def test_mla_decode_full_layer_vs_absorbed():
    """Kernel + the caller's GEMMs (q_abs = W_UK^T q_nope, o = W_UV ctx) == naive.mla_absorbed."""
    gen = torch.Generator().manual_seed(0)
    H, R, DR, Dn, Dv, n = 4, 32, 16, 24, 20, 41
    r = lambda *s: torch.randn(*s, generator=gen).to(DEV)  # noqa: E731
    q, c, kpe = r(1, H, Dn + DR), r(n, R), r(n, DR)
    k_b, v_b = r(H, R, Dn) * 0.2, r(H, Dv, R) * 0.2
    scale = naive.mla_scale(Dn + DR)
    ref = naive.mla_absorbed(q, c, kpe, k_b, v_b, torch.tensor([n - 1], device=DEV), scale)[0]  # [H, Dv]
    q_abs = torch.einsum("hrd,hd->hr", k_b, q[0, :, :Dn]).contiguous()
    ctx = mla.mla_decode(q_abs, q[0, :, Dn:].contiguous(), torch.cat([c, kpe], 1), n, scale,
                         num_splits=4, min_chunk=16, BS=16)
    assert rel(torch.einsum("hdr,hr->hd", v_b, ctx), ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_mla_cache_write(dtype, kv_dtype):
    gen = torch.Generator().manual_seed(1)
    R, DR, T, cap, p0 = 32, 16, 7, 20, 3
    kv = (torch.randn(T, R + DR, generator=gen) * 3).to(kv_dtype).to(DEV)
    w = (torch.rand(R, generator=gen) + 0.5).to(DEV)
    lat = torch.full((cap, R + DR), float("nan"), device=DEV).to(dtype)
    sc = torch.full((cap,), float("nan"), device=DEV)
    mla.mla_cache_write(kv[:T - 1], w, 1e-5, lat, p0, sc)  # prefill-style: several rows at an int position
    mla.mla_cache_write(kv[T - 1], w, 1e-5, lat, torch.tensor([p0 + T - 1], device=DEV), sc)  # decode-style
    ref = torch.cat([naive.rms_norm(kv[:, :R], w, 1e-5), kv[:, R:]], 1).float()
    got = _dequant(lat[p0:p0 + T], sc[p0:p0 + T])
    if dtype == FP8:
        # per-row scale = amax / 448; e4m3 rounding is at most half an ulp of 2^-3 relative (fp8 band)
        assert torch.allclose(sc[p0:p0 + T], ref.abs().amax(1) / 448, rtol=1e-2)
        assert ((got - ref).abs() <= ref.abs() * (2**-4 + BF16_TOL) + sc[p0:p0 + T, None] * 2**-9 * 1.01).all()
        assert rel(got, ref) < 0.04
    else:
        tol = BF16_TOL if (kv_dtype == torch.bfloat16 or dtype == torch.bfloat16) else 1e-6
        assert ((got - ref).abs() <= ref.abs() * tol + 1e-6).all()
    assert lat[:p0].float().isnan().all() and lat[p0 + T:].float().isnan().all()  # nothing else written


@pytest.mark.parametrize("n", [1, 20, 150])
def test_mla_decode_fp8(n):
    gen = torch.Generator().manual_seed(n)
    H, R, DR, cap = 4, 32, 16, 160
    kv = (torch.randn(cap, R + DR, generator=gen) * 2).to(DEV)
    w = torch.ones(R, device=DEV)
    lat8 = torch.empty(cap, R + DR, device=DEV).to(FP8)
    sc = torch.empty(cap, device=DEV)
    mla.mla_cache_write(kv, w, 1e-5, lat8, 0, sc)
    lat32 = torch.empty(cap, R + DR, device=DEV)
    mla.mla_cache_write(kv, w, 1e-5, lat32, 0)
    q_abs, q_pe = torch.randn(H, R, generator=gen).to(DEV), torch.randn(H, DR, generator=gen).to(DEV)
    scale = 1 / math.sqrt(R)
    out = mla.mla_decode(q_abs, q_pe, lat8, n, scale, latent_scale=sc, num_splits=4, min_chunk=16, BS=16)
    assert rel(out, _attend(q_abs, q_pe, lat8, sc, n, scale)) < BF16_DOT_TOL  # vs the dequantized cache
    assert rel(out, _attend(q_abs, q_pe, lat32, None, n, scale)) < 0.1  # fp8 band vs the unquantized cache


@pytest.mark.parametrize("variant", ["hm", "t", "g"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8])
def test_mla_decode_variants(variant, dtype):
    """Both kernels on every cache dtype (the defaults pick one per dtype); fp8 also widened to fp16."""
    gen = torch.Generator().manual_seed(7)
    H, R, DR, cap, n = 5, 32, 16, 80, 70
    kv = (torch.randn(cap, R + DR, generator=gen) * 2).to(DEV)
    w = (torch.rand(R, generator=gen) + 0.5).to(DEV)
    lat = torch.empty(cap, R + DR, device=DEV).to(dtype)
    sc = torch.empty(cap, device=DEV)
    mla.mla_cache_write(kv, w, 1e-5, lat, 0, sc if dtype == FP8 else None)
    lat[n:] = float("nan")
    q_abs, q_pe = torch.randn(H, R, generator=gen).to(DEV), torch.randn(H, DR, generator=gen).to(DEV)
    ref = _attend(q_abs, q_pe, lat, sc if dtype == FP8 else None, n, 0.2)
    tol = 1e-5 if (dtype == torch.float32 or DEV == "cpu") else 1e-2
    for fp8_compute in (["bf16", "fp16"] if dtype == FP8 else ["bf16"]):
        out = torch.full((H, R), float("nan"), device=DEV)
        mla.mla_decode(q_abs, q_pe, lat, torch.tensor([n], dtype=torch.int32, device=DEV), 0.2, out,
                       latent_scale=sc if dtype == FP8 else None, num_splits=3, min_chunk=16, BS=16,
                       variant=variant, fp8_compute=fp8_compute)
        assert not out.isnan().any()
        assert rel(out, ref) < tol, (variant, dtype, fp8_compute)


def test_mla_decode_gluon_build_failure_falls_back(monkeypatch):
    """A Triton whose (experimental) Gluon API the kernel does not build with: mla_decode warns once and runs the
    Triton split kernel from then on, with the right result."""
    def broken(*a, **k):
        raise AttributeError("module 'gluon.language' has no attribute 'thread_barrier'")

    monkeypatch.setattr(mla.mla_gluon, "supported", lambda *a: True)
    monkeypatch.setattr(mla.mla_gluon, "mla_split_gluon", broken)
    monkeypatch.setattr(mla, "_GLUON_FAILED", {})
    gen = torch.Generator().manual_seed(3)
    H, R, DR, n = 4, 32, 16, 90
    lat = torch.randn(n, R + DR, generator=gen).to(torch.bfloat16).to(DEV)
    q_abs, q_pe = torch.randn(H, R, generator=gen).to(DEV), torch.randn(H, DR, generator=gen).to(DEV)
    seq = torch.tensor([n], dtype=torch.int32, device=DEV)
    with pytest.warns(RuntimeWarning, match="Gluon kernel failed to build"):
        out = mla.mla_decode(q_abs, q_pe, lat, seq, 0.3, variant="g", BS=64, num_splits=3, min_chunk=64)
    assert "thread_barrier" in mla._GLUON_FAILED["bf16"]
    assert rel(out, _attend(q_abs, q_pe, lat, None, n, 0.3)) < BF16_DOT_TOL
    out2 = mla.mla_decode(q_abs, q_pe, lat, seq, 0.3, variant="g", BS=64, num_splits=3, min_chunk=64)  # no retry
    assert torch.equal(out, out2)


# ---- the decode step's fused launches: mla_absorb_write, mla_decode with v_b ---------------------
NAN = float("nan")
BF = torch.bfloat16


def _bf16_close(got, exact, absmag, ulps=1.0):
    """|got - exact| <= `ulps` bf16 ulps (2^-7 of |exact|: the interpreter truncates fp32 -> bf16, a GPU rounds
    to nearest) + the fp32 summation-order error (1e-5 of the sum of the products' magnitudes)."""
    return ((got.double() - exact.double()).abs() <= exact.double().abs() * ulps * 2**-7 + 1e-5 * absmag.double()).all()


def _same_bytes(a, b):
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))  # NaNs compare too


def _x8_within_a_step(o8, o, o_ref):
    """o8 (x8 buffer of o) and quantize_x8(o_ref) stand for values at most half a step (dx) from o and o_ref."""
    K = o.numel()
    ref8 = quantize_x8(o_ref)
    dx, dx_ref = (b[K // 4:K // 4 + K // 16].view(torch.float32).repeat_interleave(16) for b in (o8, ref8))
    diff = (dequantize_x8(o8, K) - dequantize_x8(ref8, K)).abs()
    return (diff <= (dx + dx_ref) / 2 * 1.001 + (o.float() - o_ref.float()).abs().reshape(-1) + 1e-7).all()


@pytest.mark.parametrize("dtype", [BF, FP8])
@pytest.mark.parametrize("BR,pos_tensor", [(8, True), (32, False)])
def test_mla_absorb_write_matches_cache_write_and_bmm(dtype, BR, pos_tensor):
    """One launch = mla_cache_write of the token (the row bit-identical, nothing else written) + q_abs =
    torch.bmm(k_b, q_nope) (fp32 products and sum, one rounding to bf16). q_nope is a row-strided slice of q;
    H, Dn, Dr not powers of two; R / BR = 4 absorb programs per head, or 1."""
    gen = torch.Generator().manual_seed(3)
    H, R, DN, DR, cap, p = 3, 32, 24, 12, 10, 6
    q = torch.randn(H, DN + DR, generator=gen).to(BF).to(DEV)  # q_nope = q[:, :DN]
    k_b = (torch.randn(H, R, DN, generator=gen) * 0.3).to(BF).to(DEV)
    kv = (torch.randn(1, R + DR, generator=gen) * 3).to(BF).to(DEV)
    w = (torch.rand(R, generator=gen) + 0.5).to(DEV)
    lat = torch.full((cap, R + DR), NAN, device=DEV).to(dtype)
    sc = torch.full((cap,), NAN, device=DEV)
    lat_ref, sc_ref = lat.clone(), sc.clone()
    mla.mla_cache_write(kv, w, 1e-5, lat_ref, p, sc_ref)
    out = torch.full((H, R), NAN, device=DEV).to(BF)
    if pos_tensor:
        got = mla.mla_absorb_write(q, k_b, kv, w, 1e-5, lat, torch.tensor([p], device=DEV), sc, out=out, BR=BR)
    else:  # q as [1, H, Dq], kv as [R + Dr]
        got = mla.mla_absorb_write(q[None], k_b, kv[0], w, 1e-5, lat, p, sc, out=out, BR=BR)
    assert got is out
    assert _same_bytes(lat, lat_ref) and _same_bytes(sc, sc_ref)
    assert lat[p].float().isfinite().all()
    exact = torch.einsum("hrd,hd->hr", k_b.double(), q[:, :DN].double())
    absmag = torch.einsum("hrd,hd->hr", k_b.double().abs(), q[:, :DN].double().abs())
    assert _bf16_close(out, exact, absmag)
    bmm = torch.bmm(k_b, q[:, :DN, None]).squeeze(-1)  # what the engine ran before
    assert _bf16_close(out, bmm, absmag, ulps=2)


def _vo_case(n, dtype, gen, H=5, R=32, DR=8, DV=48):
    cap = n + 3
    kv = (torch.randn(cap, R + DR, generator=gen) * 2).to(DEV)
    w = (torch.rand(R, generator=gen) + 0.5).to(DEV)
    lat = torch.empty(cap, R + DR, device=DEV).to(dtype)
    sc = torch.empty(cap, device=DEV)
    mla.mla_cache_write(kv, w, 1e-5, lat, 0, sc)
    lat[n:] = NAN  # rows past seq_len must never be read into the result
    q_abs = torch.randn(H, R, generator=gen).to(BF).to(DEV)
    q_pe = torch.randn(H, DR, generator=gen).to(BF).to(DEV)
    v_b = (torch.randn(H, DV, R, generator=gen) * 0.2).to(BF).to(DEV)
    return q_abs, q_pe, lat, sc, v_b


@pytest.mark.parametrize("n", [1, 16, 70, 257])  # 1, 1, 3 and 4 splits (num_splits=4, min_chunk=16)
@pytest.mark.parametrize("dtype", [BF, FP8])
@pytest.mark.parametrize("x8,BR", [(True, 8), (False, 8), (True, 32)])
def test_mla_decode_vo_matches_combine_bmm_quantize(n, dtype, x8, BR):
    """mla_decode with v_b (one combine launch) == combine into a bf16 ctx + torch.bmm(v_b, ctx) + quantize_x8(o):
    ctx (stored when out is given) bit-identical, o within bf16 rounding of the exact product of that ctx and of
    the bmm's o, o8 = quantize_x8 of the stored o and within a quantization step of quantize_x8(bmm's o). With
    BR < R a head's 4 partial products meet through its arrival counter, which is back at 0; a second run
    without out (ctx not stored) gives the same bits; an fp32 o (no final rounding) is the exact product of
    the bf16 ctx up to fp32 summation order."""
    gen = torch.Generator().manual_seed(n)
    H, R, DV = 5, 32, 48  # H odd, DV not a power of two (3 x8 groups per head)
    q_abs, q_pe, lat, sc, v_b = _vo_case(n, dtype, gen, H=H, R=R, DV=DV)
    seq = torch.tensor([n], dtype=torch.int32, device=DEV)
    kw = dict(latent_scale=sc if dtype == FP8 else None, num_splits=4, min_chunk=16, BS=16)
    ctx_ref = mla.mla_decode(q_abs, q_pe, lat, seq, 0.3, torch.full((H, R), NAN, device=DEV).to(BF), **kw)
    o_ref = torch.bmm(v_b, ctx_ref[:, :, None]).reshape(-1)
    ctx = torch.full((H, R), NAN, device=DEV).to(BF)
    o = torch.full((1, H * DV), NAN, device=DEV).to(BF)  # the engine's [1, H*Dv]
    o8 = torch.full((x8_words(H * DV),), -1, dtype=torch.int32, device=DEV) if x8 else None
    got = mla.mla_decode(q_abs, q_pe, lat, seq, 0.3, ctx, v_b=v_b, o=o, o8=o8, combine_BR=BR, **kw)
    assert got is o
    if DEV == "cpu":
        assert torch.equal(ctx, ctx_ref)
    else:
        torch.testing.assert_close(ctx.float(), ctx_ref.float(), rtol=2**-7, atol=1e-6)
    exact = torch.einsum("hdr,hr->hd", v_b.double(), ctx.double()).reshape(-1)
    absmag = torch.einsum("hdr,hr->hd", v_b.double().abs(), ctx.double().abs()).reshape(-1)
    assert _bf16_close(o[0], exact, absmag)
    assert _bf16_close(o[0], o_ref, absmag, ulps=2)
    if x8:
        assert torch.equal(o8, quantize_x8(o))
        assert _x8_within_a_step(o8, o, o_ref)
    assert (mla._vo_workspace(v_b.device, H, R // BR, DV)[1] == 0).all()
    o2 = torch.full((H * DV,), NAN, device=DEV).to(BF)
    o82 = torch.full((x8_words(H * DV),), -1, dtype=torch.int32, device=DEV) if x8 else None
    assert mla.mla_decode(q_abs, q_pe, lat, seq, 0.3, v_b=v_b, o=o2, o8=o82, combine_BR=BR, **kw) is o2
    assert torch.equal(o2, o[0]) and (not x8 or torch.equal(o82, o8))
    assert (mla._vo_workspace(v_b.device, H, R // BR, DV)[1] == 0).all()
    o32 = mla.mla_decode(q_abs, q_pe, lat, seq, 0.3, v_b=v_b, o=torch.full((H * DV,), NAN, device=DEV), combine_BR=BR, **kw)
    assert ((o32.double() - exact).abs() <= 1e-5 * absmag).all()  # fp32 o: the product of the bf16-rounded ctx


def test_mla_decode_vo_default_output():
    """v_b without o: a new [H*Dv] of v_b's dtype (fp32 v_b here: ctx rounded to fp32, i.e. not rounded)."""
    gen = torch.Generator().manual_seed(11)
    q_abs, q_pe, lat, sc, v_b = _vo_case(20, BF, gen, H=3, DV=16)
    v_b = v_b.float()
    ctx = mla.mla_decode(q_abs, q_pe, lat, 20, 0.3, num_splits=4, min_chunk=16, BS=16)  # fp32
    o = mla.mla_decode(q_abs, q_pe, lat, 20, 0.3, num_splits=4, min_chunk=16, BS=16, v_b=v_b)
    assert o.shape == (3 * 16,) and o.dtype == torch.float32
    assert rel(o, torch.einsum("hdr,hr->hd", v_b, ctx).reshape(-1)) < 1e-5


@pytest.mark.parametrize("dtype", [BF, FP8])
def test_mla_decode_step_fused_vs_unfused(dtype):
    """The engine's decode step (mla_absorb_write, split kernel, combine + v_b + x8) token by token at device
    positions 0, 1, 30, 31 (lengths 1 .. 32: 1 to 2 splits), against the launches it replaced (mla_cache_write,
    bmm, mla_decode, bmm, quantize_x8) on a second cache: the same cache bytes, o within the bf16 band."""
    gen = torch.Generator().manual_seed(2)
    H, R, DN, DR, DV, cap = 3, 32, 16, 8, 16, 40
    r = lambda *s, k=1.0: (torch.randn(*s, generator=gen) * k).to(BF).to(DEV)  # noqa: E731
    k_b, v_b, w = r(H, R, DN, k=0.3), r(H, DV, R, k=0.3), (torch.rand(R, generator=gen) + 0.5).to(DEV)
    lats = [torch.full((cap, R + DR), NAN, device=DEV).to(dtype) for _ in range(2)]
    scs = [torch.full((cap,), NAN, device=DEV) for _ in range(2)]
    scale = naive.mla_scale(DN + DR)
    kw = dict(num_splits=4, min_chunk=16, BS=16)
    for p in [0, 1, 30, 31]:
        if p == 30:  # rows 2..29 as a prefill chunk would write them
            kv = r(28, R + DR, k=2.0)
            for lat, sc in zip(lats, scs):
                mla.mla_cache_write(kv, w, 1e-5, lat, 2, sc)
        q, kv = r(H, DN + DR), r(1, R + DR, k=2.0)
        pos = torch.tensor([p], dtype=torch.int32, device=DEV)
        seq = torch.tensor([p + 1], dtype=torch.int32, device=DEV)
        # fused: 3 launches
        lsc = scs[0] if dtype == FP8 else None
        q_abs = mla.mla_absorb_write(q, k_b, kv, w, 1e-5, lats[0], pos, lsc, out=torch.full((H, R), NAN, device=DEV).to(BF))
        o8 = torch.full((x8_words(H * DV),), -1, dtype=torch.int32, device=DEV)
        o = mla.mla_decode(q_abs, q[:, DN:], lats[0], seq, scale, latent_scale=lsc, v_b=v_b, o8=o8, **kw)
        # unfused: the engine's former launches
        lsc = scs[1] if dtype == FP8 else None
        mla.mla_cache_write(kv, w, 1e-5, lats[1], pos, lsc)
        q_abs_ref = torch.bmm(k_b, q[:, :DN, None]).squeeze(-1)
        ctx_ref = mla.mla_decode(q_abs_ref, q[:, DN:], lats[1], seq, scale, torch.empty(H, R, device=DEV).to(BF),
                                 latent_scale=lsc, **kw)
        o_ref = torch.bmm(v_b, ctx_ref[:, :, None]).reshape(-1)
        assert _same_bytes(lats[0], lats[1]) and _same_bytes(scs[0], scs[1])
        assert rel(o, o_ref) < 1e-2, p
        assert torch.equal(o8, quantize_x8(o)) and _x8_within_a_step(o8, o, o_ref)


# ---- GPU, real shapes ------------------------------------------------------------------------
def _real_case(n, dtype, gen, cap=None):
    H, R, DR = 32, 512, 64
    cap = cap or n
    kv = torch.randn(cap, R + DR, generator=gen).to(torch.bfloat16).cuda()
    w = (torch.rand(R, generator=gen) + 0.5).cuda()
    lat = torch.empty(cap, R + DR, dtype=dtype, device="cuda")
    sc = torch.empty(cap, device="cuda")
    mla.mla_cache_write(kv, w, 1e-5, lat, 0, sc)
    q_abs = (torch.randn(H, R, generator=gen) * 0.1).to(torch.bfloat16).cuda()
    q_pe = torch.randn(H, DR, generator=gen).to(torch.bfloat16).cuda()
    return q_abs, q_pe, lat, sc


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 7, 4096, 4097, 33333, 131072])
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("variant", [None, "hm", "t", "g"])
def test_mla_decode_real_shapes(n, dtype, variant):
    gen = torch.Generator().manual_seed(n)
    q_abs, q_pe, lat, sc = _real_case(n, dtype, gen)
    scale = 1 / math.sqrt(192)
    out = torch.full((32, 512), float("nan"), device="cuda")
    kw = {} if variant is None else dict(variant=variant, BS=32 if variant == "hm" else 64)
    seq = torch.tensor([n], dtype=torch.int32, device="cuda") if variant == "g" else n  # "g" reads it on the device
    mla.mla_decode(q_abs, q_pe, lat, seq, scale, out, latent_scale=sc, **kw)
    ref = _attend(q_abs, q_pe, lat, sc, n, scale)
    assert rel(out, ref) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 63, 64, 65, 4097, 131072])
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8])
def test_mla_gluon_split_runs_and_matches(n, dtype):
    """The Gluon split kernels (kernels/mla_gluon.py) are taken on this GPU for bf16 and fp8 caches (no silent
    fallback) and match the reference, with heads < 32 (masked) too."""
    gen = torch.Generator().manual_seed(n + 1)
    q_abs, q_pe, lat, sc = _real_case(n, dtype, gen)
    assert mla.mla_gluon.supported(lat, 32, 512, 64)
    scale = 1 / math.sqrt(192)
    seq = torch.tensor([n], dtype=torch.int32, device="cuda")
    for H in (32, 20):
        ref = _attend(q_abs[:H], q_pe[:H], lat, sc, n, scale)
        out = torch.full((H, 512), float("nan"), device="cuda")
        mla.mla_decode(q_abs[:H].contiguous(), q_pe[:H], lat, seq, scale, out, latent_scale=sc, variant="g", BS=64)
        assert rel(out, ref) < 1e-2, H


@pytest.mark.cuda
def test_mla_cache_write_real_exact():
    gen = torch.Generator().manual_seed(0)
    R = 512
    kv = torch.randn(64, R + 64, generator=gen).to(torch.bfloat16).cuda()
    w = (torch.rand(R, generator=gen) + 0.5).to(torch.bfloat16).cuda()
    lat = torch.empty(64, R + 64, dtype=torch.bfloat16, device="cuda")
    mla.mla_cache_write(kv, w, 1e-5, lat, 0)
    ref = torch.cat([naive.rms_norm(kv[:, :R], w, 1e-5), kv[:, R:]], 1)
    ulp = (lat.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-30)
    assert (ulp <= 2**-7).all()  # at most 1 bf16 ulp (rsqrt / summation-order differences)


@pytest.mark.cuda
def test_mla_decode_graph_growing_length():
    gen = torch.Generator().manual_seed(5)
    cap = 20000
    q_abs, q_pe, lat, sc = _real_case(cap, torch.bfloat16, gen)
    scale = 1 / math.sqrt(192)
    seq = torch.tensor([1], dtype=torch.int32, device="cuda")
    out = torch.empty(32, 512, device="cuda")
    mla.mla_decode(q_abs, q_pe, lat, seq, scale, out)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        mla.mla_decode(q_abs, q_pe, lat, seq, scale, out)
    for n in [1, 2, 100, 129, 4096, 12345, 20000]:
        seq.fill_(n)
        out.fill_(float("nan"))
        g.replay()
        assert rel(out, _attend(q_abs, q_pe, lat, None, n, scale)) < 1e-2, n


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [BF, FP8])
def test_mla_absorb_write_real_shapes(dtype):
    """32 heads, R 512, Dn 128, Dr 64: the cache row bit-identical to mla_cache_write's, q_abs within one bf16
    rounding of the exact product (and of cuBLAS's bmm: summation order only)."""
    gen = torch.Generator().manual_seed(4)
    H, R, DN, DR, cap, p = 32, 512, 128, 64, 8, 5
    q = torch.randn(H, DN + DR, generator=gen).to(BF).cuda()
    k_b = (torch.randn(H, R, DN, generator=gen) * 0.1).to(BF).cuda()
    kv = torch.randn(1, R + DR, generator=gen).to(BF).cuda()
    w = (torch.rand(R, generator=gen) + 0.5).cuda()
    lat = torch.full((cap, R + DR), NAN, device="cuda").to(dtype)
    sc = torch.full((cap,), NAN, device="cuda")
    lat_ref, sc_ref = lat.clone(), sc.clone()
    mla.mla_cache_write(kv, w, 1e-5, lat_ref, p, sc_ref)
    out = torch.full((H, R), NAN, device="cuda").to(BF)
    mla.mla_absorb_write(q, k_b, kv, w, 1e-5, lat, torch.tensor([p], dtype=torch.int32, device="cuda"), sc, out=out)
    assert _same_bytes(lat, lat_ref) and _same_bytes(sc, sc_ref)
    exact = torch.einsum("hrd,hd->hr", k_b.double(), q[:, :DN].double())
    absmag = torch.einsum("hrd,hd->hr", k_b.double().abs(), q[:, :DN].double().abs())
    assert _bf16_close(out, exact, absmag, ulps=0.5)
    assert _bf16_close(out, torch.bmm(k_b, q[:, :DN, None]).squeeze(-1), absmag, ulps=1)


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 4096, 131072])
@pytest.mark.parametrize("dtype", [BF, FP8])
@pytest.mark.parametrize("x8", [True, False])
def test_mla_decode_vo_real_shapes(n, dtype, x8):
    """The default launch configuration at the model's shapes (Dv 128, R / 64 = 8 partials per head) against
    combine + cuBLAS bmm + quantize_x8."""
    gen = torch.Generator().manual_seed(n)
    H, R, DV = 32, 512, 128
    q_abs, q_pe, lat, sc = _real_case(n, dtype, gen)
    v_b = (torch.randn(H, DV, R, generator=gen) * 0.05).to(BF).cuda()
    scale = 1 / math.sqrt(192)
    ctx_ref = mla.mla_decode(q_abs, q_pe, lat, n, scale, torch.full((H, R), NAN, device="cuda").to(BF), latent_scale=sc)
    o_ref = torch.bmm(v_b, ctx_ref[:, :, None]).reshape(-1)
    ctx = torch.full((H, R), NAN, device="cuda").to(BF)
    o = torch.full((1, H * DV), NAN, device="cuda").to(BF)
    o8 = torch.full((x8_words(H * DV),), -1, dtype=torch.int32, device="cuda") if x8 else None
    mla.mla_decode(q_abs, q_pe, lat, n, scale, ctx, latent_scale=sc, v_b=v_b, o=o, o8=o8)
    torch.testing.assert_close(ctx.float(), ctx_ref.float(), rtol=2**-7, atol=1e-6)
    exact = torch.einsum("hdr,hr->hd", v_b.double(), ctx.double()).reshape(-1)
    absmag = torch.einsum("hdr,hr->hd", v_b.double().abs(), ctx.double().abs()).reshape(-1)
    assert _bf16_close(o[0], exact, absmag, ulps=0.5)
    assert rel(o, o_ref) < 1e-2
    if x8:
        assert torch.equal(o8, quantize_x8(o))
        assert _x8_within_a_step(o8, o, o_ref)
    assert (mla._vo_workspace(v_b.device, H, R // 64, DV)[1] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [BF, FP8])
def test_mla_decode_step_graph_growing_length(dtype, monkeypatch):
    """The engine's three MLA decode launches (mla_absorb_write, split, combine + v_b + x8) captured once and
    replayed at growing lengths through device position / length tensors; the MLA launches without PDL
    (KIMI_LOCAL_MLA_PDL=0) and, where supported, with it (the default): bitwise the same results. Rows from the new one on
    are NaN before each replay, so a split that read the new row before its PDL wait would fail."""
    gen = torch.Generator().manual_seed(5)
    H, R, DN, DR, DV, cap = 32, 512, 128, 64, 128, 20000
    scale = 1 / math.sqrt(DN + DR)
    kvs = torch.randn(cap, R + DR, generator=gen).to(BF).cuda()
    w = (torch.rand(R, generator=gen) + 0.5).cuda()
    k_b = (torch.randn(H, R, DN, generator=gen) * 0.1).to(BF).cuda()
    v_b = (torch.randn(H, DV, R, generator=gen) * 0.05).to(BF).cuda()
    lat_full = torch.empty(cap, R + DR, dtype=dtype, device="cuda")
    sc_full = torch.empty(cap, device="cuda")
    mla.mla_cache_write(kvs, w, 1e-5, lat_full, 0, sc_full)  # what the graph's writes must reproduce
    lengths = [1, 2, 100, 129, 4096, 12345, 20000]
    qs = [torch.randn(H, DN + DR, generator=gen).to(BF).cuda() for _ in lengths]
    lat, sc = lat_full.clone(), sc_full.clone()
    q_buf, kv_buf = torch.empty(H, DN + DR, dtype=BF, device="cuda"), torch.empty(1, R + DR, dtype=BF, device="cuda")
    pos, seq = torch.zeros(1, dtype=torch.int32, device="cuda"), torch.ones(1, dtype=torch.int32, device="cuda")
    q_abs = torch.empty(H, R, dtype=BF, device="cuda")
    o = torch.empty(1, H * DV, dtype=BF, device="cuda")
    o8 = torch.empty(x8_words(H * DV), dtype=torch.int32, device="cuda")

    def step():
        mla.mla_absorb_write(q_buf, k_b, kv_buf, w, 1e-5, lat, pos, sc, out=q_abs)
        mla.mla_decode(q_abs, q_buf[:, DN:], lat, seq, scale, latent_scale=sc, v_b=v_b, o=o, o8=o8)

    modes = ["0", "1"] if pdl.supported("cuda") else ["0"]
    results = {}
    for mode in modes:
        monkeypatch.setenv("KIMI_LOCAL_MLA_PDL", mode)
        with pdl.active(pdl.supported("cuda")):
            q_buf.copy_(qs[0])
            kv_buf.copy_(kvs[:1])
            step()  # warm-up: compile, workspaces
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
        outs = []
        for n, q in zip(lengths, qs):
            lat.copy_(lat_full)
            sc.copy_(sc_full)
            lat[n - 1:] = NAN  # the new row comes from the graph, rows past it must not be read
            sc[n - 1:] = NAN
            q_buf.copy_(q)
            kv_buf.copy_(kvs[n - 1:n])
            pos.fill_(n - 1)
            seq.fill_(n)
            for t in (q_abs, o):
                t.fill_(NAN)
            o8.fill_(-1)
            g.replay()
            torch.cuda.synchronize()
            assert _same_bytes(lat[n - 1], lat_full[n - 1]) and (dtype != FP8 or torch.equal(sc[n - 1], sc_full[n - 1]))
            q_abs_ref = torch.bmm(k_b, q[:, :DN, None]).squeeze(-1)
            absmag = torch.einsum("hrd,hd->hr", k_b.double().abs(), q[:, :DN].double().abs())
            assert _bf16_close(q_abs, q_abs_ref, absmag, ulps=1), n
            ctx_ref = mla.mla_decode(q_abs_ref, q[:, DN:], lat_full, n, scale, torch.empty(H, R, dtype=BF, device="cuda"),
                                     latent_scale=sc_full)
            o_ref = torch.bmm(v_b, ctx_ref[:, :, None]).reshape(1, -1)
            assert rel(o, o_ref) < 1e-2, n
            assert torch.equal(o8, quantize_x8(o)), n
            assert (mla._vo_workspace(v_b.device, H, R // 64, DV)[1] == 0).all()
            outs.append((q_abs.clone(), o.clone(), o8.clone()))
        results[mode] = outs
    for mode in modes[1:]:
        for got, base in zip(results[mode], results[modes[0]]):
            assert torch.equal(got[0], base[0])  # q_abs: the same launch either way
            # the same split kernel with and without its PDL wait (Gluon on Hopper, else "t"): bitwise
            assert torch.equal(got[1], base[1]) and torch.equal(got[2], base[2])
