"""MLA decode kernels (kernels/mla.py) vs the pure-torch references (kernels/naive.py).

CPU: tiny shapes under TRITON_INTERPRET=1; GPU (@cuda): 32 heads, latent 512 + 64, up to 128K rows,
bf16 and fp8, CUDA-graph replay at growing lengths.
"""
import math

import sys
from pathlib import Path

import pytest
import torch

try:
    from kimi_local.kernels import mla, naive
except ImportError:  # not pip-installed (device machine): import the source dirs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import mla, naive

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


@pytest.mark.parametrize("min_chunk,splits", [(16, 3), (64, 8), (16, 16)])
def test_mla_decode_split_shapes(min_chunk, splits):
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


@pytest.mark.parametrize("variant", ["hm", "t"])
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
@pytest.mark.parametrize("variant", [None, "hm", "t"])
def test_mla_decode_real_shapes(n, dtype, variant):
    gen = torch.Generator().manual_seed(n)
    q_abs, q_pe, lat, sc = _real_case(n, dtype, gen)
    scale = 1 / math.sqrt(192)
    out = torch.full((32, 512), float("nan"), device="cuda")
    kw = {} if variant is None else dict(variant=variant, BS=64 if variant == "t" else 32)
    mla.mla_decode(q_abs, q_pe, lat, n, scale, out, latent_scale=sc, **kw)
    ref = _attend(q_abs, q_pe, lat, sc, n, scale)
    assert rel(out, ref) < 1e-2


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
