"""Triton norms: KimiRMSNorm with an optional fused residual add (one launch instead of ~6 torch kernels per
norm in the decode graph), and the KDA output's per-head sigmoid-gated RMSNorm for prefill.
Semantics are naive.rms_norm's / naive.gated_rms_norm's (spec 3.2, 3.3f)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import gdc_launch_dependents, gdc_wait
from .quant_matmul import _x8_put, _x8n_put, x8_words, x8n_words

_INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rms_scaled(b_xf, b_w, D, eps, xdt: tl.constexpr):
    """naive.rms_norm's roundings: normalise x (fp32 [BD], masked lanes 0) in fp32, round to the activation
    dtype xdt, times the weight (already rounded to xdt): fp32 [BD]."""
    b_n = (b_xf * tl.rsqrt(tl.sum(b_xf * b_xf, 0) / D + eps)).to(xdt).to(tl.float32)
    return b_n * b_w


@triton.jit
def _x8_row(x8, D, b_o, BD: tl.constexpr):
    """Store a [BD] row (D valid values, D % 16 == 0) as quant_matmul's x8 buffer."""
    _x8_put(x8, D, 0, D // 16, b_o.to(tl.float32), BD // 16)


@triton.jit
def rms_norm_kernel(
    x, res, res_out, w, out, x8, eps,  # x [T, D]; res / res_out [T, D] (HAS_RES); w [D]; out [T, D]; x8 (X8)
    stride_x, stride_r, stride_ro, stride_o,
    D: tl.constexpr, BD: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr, X8: tl.constexpr,
    X8N: tl.constexpr = False,
):
    # X8N (one row): no normalisation here; x8 receives the normed x8 buffer of x (quant_matmul.x8n_words)
    i_t = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    xdt = x.dtype.element_ty
    b_w = tl.load(w + o_d, mask=m_d, other=0).to(xdt).to(tl.float32)  # a weight: read before the PDL wait
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    b_x = tl.load(x + i_t * stride_x + o_d, mask=m_d, other=0)
    if HAS_RES:
        # h = x + residual in the activation dtype (a bf16 add rounds once, like torch)
        b_x = (b_x.to(tl.float32) + tl.load(res + i_t * stride_r + o_d, mask=m_d, other=0).to(tl.float32)).to(xdt)
        tl.store(res_out + i_t * stride_ro + o_d, b_x, mask=m_d)
    if X8N:
        _x8n_put(x8, D, 0, D // 16, b_x.to(tl.float32), b_w, BD // 16)
    else:
        b_o = _rms_scaled(b_x.to(tl.float32), b_w, D, eps, xdt).to(out.dtype.element_ty)
        tl.store(out + i_t * stride_o + o_d, b_o, mask=m_d)
        if X8:  # the stored values as int8 activations (quant_matmul's x8 buffer; one row, D % 16 == 0)
            _x8_row(x8, D, b_o, BD)


def rms_norm(x, w, eps: float, out=None, residual=None, residual_out=None, x8_out=None):
    """y = naive.rms_norm(x + residual if residual is given else x, w, eps) over the last axis.
    x [T, D] or [D]; residual like x; residual_out (default: residual, in place) receives x + residual.
    x8_out (T = 1): int32 [x8_words(D)], also receives y as int8 activations (quant_matmul.quantize_x8 of
    the stored y) for the GEMVs that read it. Returns out (x's dtype unless given). One program per row;
    graph-capturable; PDL-aware (kernels.pdl)."""
    x2 = x.view(-1, x.shape[-1])
    T, D = x2.shape
    out = torch.empty_like(x) if out is None else out
    o2 = out.view(-1, D)
    has_res = residual is not None
    r2 = residual.view(-1, D) if has_res else x2
    ro2 = (residual_out if residual_out is not None else residual).view(-1, D) if has_res else x2
    for t in (x2, r2, ro2, o2):
        assert t.stride(-1) == 1
    BD = triton.next_power_of_2(D)
    if x8_out is not None:
        assert T == 1 and x8_out.dtype == torch.int32 and x8_out.numel() == x8_words(D) and x8_out.is_contiguous()
    rms_norm_kernel[(T,)](x2, r2, ro2, w, o2, x8_out if x8_out is not None else o2, eps, x2.stride(0), r2.stride(0),
                          ro2.stride(0), o2.stride(0),
                          D=D, BD=max(BD, 16), HAS_RES=has_res, PDL=pdl.enabled(), X8=x8_out is not None,
                          num_warps=1 if _INTERP else min(16, max(1, BD // 256)), **pdl.launch_kw())
    return out


def add_norm_x8n(v, residual, w, x8n):
    """One token: residual += v (in place, rounded once as rms_norm rounds it), and x8n (int32 [x8n_words(D)])
    <- the normed x8 buffer of the new residual for the RMSNorm with weight w (quant_matmul's "normed x8": the
    consumer GEMV applies 1 / rms). The stand-alone form of the MoE down kernel's fused epilogue (moe.moe_decode's
    res_norm), for the paths that have no such epilogue. v, residual [D] or [1, D]. Graph-capturable, PDL-aware."""
    D = v.shape[-1]
    assert v.numel() == D and residual.numel() == D and v.is_contiguous() and residual.is_contiguous()
    assert x8n.dtype == torch.int32 and x8n.numel() == x8n_words(D) and x8n.is_contiguous()
    v2, r2 = v.view(1, D), residual.view(1, D)
    BD = max(16, triton.next_power_of_2(D))
    rms_norm_kernel[(1,)](v2, r2, r2, w, v2, x8n, 0.0, D, D, D, D, D=D, BD=BD, HAS_RES=True, PDL=pdl.enabled(),
                          X8=False, X8N=True, num_warps=1 if _INTERP else min(16, max(1, BD // 256)),
                          **pdl.launch_kw())
    return x8n


@triton.jit
def gated_rms_norm_kernel(
    o, z, w, out, eps,  # o, z, out [T, H*V] (rows strided); w [V]
    stride_o, stride_z, stride_out,
    H: tl.constexpr, V: tl.constexpr, BH: tl.constexpr, BV: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    o_h = tl.arange(0, BH)
    o_v = tl.arange(0, BV)
    m = (o_h < H)[:, None] & (o_v < V)[None, :]
    ch = o_h[:, None] * V + o_v[None, :]
    b_o = tl.load(o + i_t * stride_o + ch, mask=m, other=0).to(tl.float32)  # [BH, BV]
    b_z = tl.load(z + i_t * stride_z + ch, mask=m, other=0).to(tl.float32)
    b_w = tl.load(w + o_v, mask=o_v < V, other=0).to(tl.float32)
    b_y = b_o * tl.rsqrt(tl.sum(b_o * b_o, 1) / V + eps)[:, None] * b_w[None, :] * tl.sigmoid(b_z)
    tl.store(out + i_t * stride_out + ch, b_y.to(out.dtype.element_ty), mask=m)


def gated_rms_norm(o, z, w, eps: float, out=None):
    """naive.gated_rms_norm for T tokens: per-head RMSNorm of o [T, H, V] times w [V] times sigmoid(z);
    fp32 math. z [T, H, V] (or [T, H*V]); out [T, H, V] (default fp32). Returns out."""
    T, H, V = o.shape
    out = torch.empty(T, H, V, dtype=torch.float32, device=o.device) if out is None else out
    z2 = z.reshape(T, H * V)
    o2, out2 = o.reshape(T, H * V), out.view(T, H * V)
    assert o.stride(-1) == 1 and z2.stride(-1) == 1 and out.is_contiguous()
    BH, BV = triton.next_power_of_2(H), triton.next_power_of_2(V)
    gated_rms_norm_kernel[(T,)](o2, z2, w, out2, eps, o2.stride(0), z2.stride(0), out2.stride(0),
                                H=H, V=V, BH=BH, BV=BV, num_warps=1 if _INTERP else min(16, max(4, BH * BV // 512)))
    return out
