"""Matmuls that read ggml-quantized weights directly (Q8_0, Q6_K, Q5_K, Q4_K, Q3_K, Q2_K, BF16).

Weights are repacked once at load time (`repack`) from ggml's array-of-blocks rows into one
struct-of-arrays "plane" per block field, per matrix. Lossless; same bytes except that the 6-bit
packed scales of Q4_K/Q5_K/Q3_K are unpacked to one byte each (+2.8% / +2.3% / +3.6%). Every plane
row is 16-byte aligned (K % 256 == 0), so kernels load 16 contiguous quant bytes per vector
(ggml's 210/110/84/34-byte blocks are not even 4-byte aligned).

Packed matrix [N, K] = concatenation, in this order, of planes of shape [N * NB, bytes] (NB blocks per row):
    Q8_0 (NB = K/32):  qs 32 (int8), d 2 (fp16)
    Q6_K (NB = K/256): ql 128, qh 64, sc 16 (int8), d 2 (fp16)
    Q5_K:              qs 128, qh 32, sc 8, m 8, dd 4 (fp16 d, dmin)
    Q4_K:              qs 128, sc 8, m 8, dd 4
    Q3_K:              qs 64, hm 32, sc 16 (int8, already minus 32), d 2
    Q2_K:              qs 64, sc 16 (ggml nibbles: scale | min << 4), dd 4
    BF16:              the bf16 matrix itself (row-major)
It is stored as uint8 [..., N, packed_row_bytes]; leading dims (e.g. expert slots) are independent matrices.

The tile helper `_dq_tile` returns a weight tile in natural K order as (q, A, B) with
w = q * A - B: q [R, G, 16] integer-valued fp32, A/B [R, G] per group of 16 elements, so a GEMV
applies the scales after its 16-wide reduction and a GEMM applies them per element before tl.dot.
Integers become floats through the exponent trick (v | 0x4B000000 reinterpreted is 2^23 + v): one
LOP3 + one FADD instead of I2F, which runs at 1/8 rate on sm_90.

Floors (H100 ~3.0 TB/s measured copy; bytes per weight: Q8_0 1.0625, Q6_K 0.82, Q5_K 0.70,
Q4_K 0.578, Q3_K 0.445, Q2_K 0.328, BF16 2):
    lm_head [163840, 2304] Q6_K: 310 MB -> 103 us; Q4_K 218 MB -> 73 us; bf16 755 MB -> 250 us.
    KDA q/k/v proj [4096, 2304] Q8_0: 10 MB -> 3.3 us (launch-latency territory).
    Prefill GEMM M=8192, [4096, 2304]: 155 GFLOP -> ~200 us at ~780 TFLOP/s (compute bound);
    dequant-to-scratch costs ~19 MB bf16 written+read -> ~13 us extra (so scratch+cuBLAS wins for big M).
"""
import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import gdc_launch_dependents, gdc_wait, prefetch_l2_bulk

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

QK = {"Q8_0": 32, "Q6_K": 256, "Q5_K": 256, "Q4_K": 256, "Q3_K": 256, "Q2_K": 256, "BF16": 1}
# ggml bytes per block
TYPE_SIZE = {"Q8_0": 34, "Q6_K": 210, "Q5_K": 176, "Q4_K": 144, "Q3_K": 110, "Q2_K": 84, "BF16": 2}
# packed bytes per block
PACKED_SIZE = {"Q8_0": 34, "Q6_K": 210, "Q5_K": 180, "Q4_K": 148, "Q3_K": 114, "Q2_K": 84, "BF16": 2}
QTYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "BF16")
# constexpr id per type inside kernels
QT_ID = {"Q8_0": 0, "Q6_K": 1, "Q5_K": 2, "Q4_K": 3, "Q3_K": 4, "Q2_K": 5, "BF16": 6}


def packed_row_bytes(qtype, K):
    assert K % QK[qtype] == 0, f"{qtype}: K={K} is not a multiple of {QK[qtype]}"
    if QK[qtype] == 256:
        assert K % 256 == 0
    return K // QK[qtype] * PACKED_SIZE[qtype]


def _k_scale_min(s):
    """ggml get_scale_min_k4 for all 8 sub-blocks: s [..., 12] uint8 -> sc, m [..., 8] uint8."""
    s = s.to(torch.int32)
    sc_lo, m_lo = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc_hi = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    m_hi = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat([sc_lo, sc_hi], -1).to(torch.uint8), torch.cat([m_lo, m_hi], -1).to(torch.uint8)


def _q3_scales(s):
    """Q3_K 12 packed bytes -> 16 signed scales (value - 32): s [..., 12] -> int8 [..., 16]."""
    s = s.to(torch.int32)
    j = torch.arange(16, device=s.device)
    low = (s[..., j % 8] >> (4 * (j // 8))) & 0xF
    high = (s[..., 8 + j % 4] >> (2 * (j // 4))) & 3
    return ((low | (high << 4)) - 32).to(torch.int8).view(torch.uint8)


def repack(data, qtype):
    """ggml rows uint8 [..., N, row_bytes] -> packed uint8 [..., N, packed_row_bytes] (see module doc).
    BF16 input may be a bf16 [..., N, K] tensor or its bytes."""
    if qtype == "BF16":
        return data.contiguous().view(torch.uint8) if data.dtype != torch.uint8 else data.contiguous()
    assert data.dtype == torch.uint8
    *lead, N, rb = data.shape
    ts = TYPE_SIZE[qtype]
    assert rb % ts == 0
    nb = rb // ts
    blk = data.reshape(*lead, N * nb, ts)
    f = lambda a, b: blk[..., a:b]  # noqa: E731
    if qtype == "Q8_0":
        planes = [f(2, 34), f(0, 2)]
    elif qtype == "Q6_K":
        planes = [f(0, 128), f(128, 192), f(192, 208), f(208, 210)]
    elif qtype == "Q5_K":
        sc, m = _k_scale_min(f(4, 16))
        planes = [f(48, 176), f(16, 48), sc, m, f(0, 4)]
    elif qtype == "Q4_K":
        sc, m = _k_scale_min(f(4, 16))
        planes = [f(16, 144), sc, m, f(0, 4)]
    elif qtype == "Q3_K":
        planes = [f(32, 96), f(0, 32), _q3_scales(f(96, 108)), f(108, 110)]
    elif qtype == "Q2_K":
        planes = [f(16, 80), f(0, 16), f(80, 84)]
    else:
        raise ValueError(qtype)
    out = torch.cat([p.reshape(*lead, -1) for p in planes], -1)
    return out.reshape(*lead, N, nb * PACKED_SIZE[qtype])


# ----------------------------------------------------------------------------------------------
# Tile dequantization (shared with moe.py)


@triton.jit
def _i2f(v, bias: tl.constexpr):
    # v int32 in [0, 2^23): float(v) - bias, exactly, without I2F
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + bias)


@triton.jit
def _dq_tile(w, n, n_mask, gg, N, K, QT: tl.constexpr):
    """Dequantize weight rows `n` [R] (int64) at 16-element groups `gg` [G] (global group index along
    K) of the packed matrix at uint8 pointer `w` ([N, K]). Returns q [R, G, 16] fp32, A, B [R, G] (or
    broadcastable) fp32 with weight = q * A[..., None] - B[..., None]. Out-of-range rows/groups give q = 0."""
    q = _dq_q(w, n, n_mask, gg, N, K, QT)
    A, B = _dq_ab(w, n, n_mask, gg, N, K, QT)
    return q, A, B


@triton.jit
def _dq_q(w, n, n_mask, gg, N, K, QT: tl.constexpr):
    """The integer part q [R, G, 16] fp32 of `_dq_tile` (the quant planes)."""
    l16 = tl.arange(0, 16)
    mask3 = (n_mask[:, None] & (gg * 16 < K)[None, :])[:, :, None]
    l3 = l16[None, None, :]
    if QT == 6:  # BF16
        off = n[:, None, None] * K + (gg * 16)[None, :, None] + l3
        q = tl.load(w.to(tl.pointer_type(tl.bfloat16)) + off, mask=mask3, other=0.0).to(tl.float32)
    elif QT == 0:  # Q8_0: qs [N*NB, 32], d [N*NB] fp16
        off = n[:, None, None] * K + (gg * 16)[None, :, None] + l3
        v = tl.load(w + off, mask=mask3, other=128).to(tl.int32)
        q = _i2f(v ^ 0x80, 128.0)
    else:
        NBT = N.to(tl.int64) * (K // 256)
        g = gg % 16
        rb3 = (n[:, None] * (K // 256) + (gg // 16)[None, :])[:, :, None]  # [R, G, 1] block index in the matrix
        half = (g % 2) * 16  # [G] which 16 of a 32-run
        if QT == 3 or QT == 2:  # Q4_K / Q5_K
            qs = tl.load(w + rb3 * 128 + ((g // 4) * 32 + half)[None, :, None] + l3, mask=mask3, other=0)
            sub = g // 2
            v = (qs.to(tl.int32) >> (4 * (sub % 2))[None, :, None]) & 0xF
            if QT == 2:
                qh = tl.load(w + NBT * 128 + rb3 * 32 + half[None, :, None] + l3, mask=mask3, other=0)
                v = v | (((qh.to(tl.int32) >> sub[None, :, None]) & 1) << 4)
            q = _i2f(v, 0.0)
        elif QT == 1:  # Q6_K
            c = (g // 2) % 4
            nh = g // 8
            ql = tl.load(w + rb3 * 128 + (nh * 64 + (c % 2) * 32 + half)[None, :, None] + l3,
                         mask=mask3, other=0)
            qh = tl.load(w + NBT * 128 + rb3 * 64 + (nh * 32 + half)[None, :, None] + l3,
                         mask=mask3, other=0)
            v = (ql.to(tl.int32) >> (4 * (c // 2))[None, :, None]) & 0xF
            v = v | (((qh.to(tl.int32) >> (2 * c)[None, :, None]) & 3) << 4)
            q = _i2f(v, 32.0)
        else:  # Q3_K (4) / Q2_K (5): qs [64] first
            j = (g // 2) % 4
            nh = g // 8
            qs = tl.load(w + rb3 * 64 + (nh * 32 + half)[None, :, None] + l3, mask=mask3, other=0)
            v = (qs.to(tl.int32) >> (2 * j)[None, :, None]) & 3
            if QT == 4:
                hm = tl.load(w + NBT * 64 + rb3 * 32 + half[None, :, None] + l3, mask=mask3, other=0)
                v = v | (((hm.to(tl.int32) >> (g // 2)[None, :, None]) & 1) << 2)
                q = _i2f(v, 4.0)
            else:
                q = _i2f(v, 0.0)
    return q


@triton.jit
def _dq_ab(w, n, n_mask, gg, N, K, QT: tl.constexpr):
    """The per-group scale A and offset B [R, G] (or [1, 1]) fp32 of `_dq_tile` (the side planes)."""
    mask2 = n_mask[:, None] & (gg * 16 < K)[None, :]  # [R, G]
    if QT == 6:  # BF16
        A = tl.full([1, 1], 1.0, tl.float32)
        B = tl.zeros([1, 1], tl.float32)
    elif QT == 0:  # Q8_0
        rb = n[:, None] * (K // 32) + (gg // 2)[None, :]
        d = tl.load(w.to(tl.pointer_type(tl.float16)) + N.to(tl.int64) * (K // 32) * 16 + rb, mask=mask2, other=0.0)
        A = d.to(tl.float32)
        B = tl.zeros([1, 1], tl.float32)
    else:
        NBT = N.to(tl.int64) * (K // 256)
        g = gg % 16
        rb = n[:, None] * (K // 256) + (gg // 16)[None, :]  # [R, G] block index in the matrix
        if QT == 3 or QT == 2:  # Q4_K / Q5_K: sc [8], m [8], then (d, dmin) fp16
            sub = g // 2
            o_sc = NBT * 128 if QT == 3 else NBT * 160
            sc = tl.load(w + o_sc + rb * 8 + sub[None, :], mask=mask2, other=0).to(tl.float32)
            m = tl.load(w + o_sc + NBT * 8 + rb * 8 + sub[None, :], mask=mask2, other=0).to(tl.float32)
            dd = w.to(tl.pointer_type(tl.float16)) + (o_sc + NBT * 16) // 2 + rb * 2
            d = tl.load(dd, mask=mask2, other=0.0).to(tl.float32)
            dmin = tl.load(dd + 1, mask=mask2, other=0.0).to(tl.float32)
            A = d * sc
            B = dmin * m
        elif QT == 1 or QT == 4:  # Q6_K / Q3_K: sc [16] int8 (Q3_K's already minus 32), then d fp16
            o_sc = NBT * 192 if QT == 1 else NBT * 96
            sc = tl.load((w + o_sc).to(tl.pointer_type(tl.int8)) + rb * 16 + g[None, :],
                         mask=mask2, other=0).to(tl.float32)
            d = tl.load((w + o_sc + NBT * 16).to(tl.pointer_type(tl.float16)) + rb, mask=mask2,
                        other=0.0).to(tl.float32)
            A = d * sc
            B = tl.zeros([1, 1], tl.float32)
        else:  # Q2_K: sc [16] (scale | min << 4), (d, dmin) fp16
            sc = tl.load(w + NBT * 64 + rb * 16 + g[None, :], mask=mask2, other=0).to(tl.int32)
            dd = (w + NBT * 80).to(tl.pointer_type(tl.float16)) + rb * 2
            d = tl.load(dd, mask=mask2, other=0.0).to(tl.float32)
            dmin = tl.load(dd + 1, mask=mask2, other=0.0).to(tl.float32)
            A = d * (sc & 15).to(tl.float32)
            B = dmin * (sc >> 4).to(tl.float32)
    return A, B


@triton.jit
def _dq_dot_rows(x, stride_xk, w, n, n_mask, N, K, QT: tl.constexpr, BR: tl.constexpr, G: tl.constexpr):
    """[BR] fp32: rows `n` of the packed [N, K] matrix at `w` dotted with the vector x[k * stride_xk]."""
    acc = tl.zeros([BR, G], tl.float32)
    for g0 in range(0, tl.cdiv(K, 16), G):
        gg = g0 + tl.arange(0, G)
        q, A, B = _dq_tile(w, n, n_mask, gg, N, K, QT)
        k_off = (gg * 16)[:, None] + tl.arange(0, 16)[None, :]  # [G, 16]
        b_x = tl.load(x + k_off * stride_xk, mask=k_off < K, other=0.0).to(tl.float32)
        acc += A * tl.sum(q * b_x[None, :, :], axis=2) - B * tl.sum(b_x, axis=1)[None, :]
    return tl.sum(acc, axis=1)


# ----------------------------------------------------------------------------------------------
# Dequantize to bf16


@triton.jit
def _dequant_kernel(w, out, N, K, stride_on, QT: tl.constexpr, BR: tl.constexpr, G: tl.constexpr):
    i_r, i_g = tl.program_id(0), tl.program_id(1)
    n = i_r * BR + tl.arange(0, BR).to(tl.int64)
    gg = i_g * G + tl.arange(0, G)
    q, A, B = _dq_tile(w, n, n < N, gg, N, K, QT)
    wv = q * A[:, :, None] - B[:, :, None]
    off = n[:, None, None] * stride_on + (gg * 16)[None, :, None] + tl.arange(0, 16)[None, None, :]
    msk = (n < N)[:, None, None] & (gg * 16 < K)[None, :, None]
    tl.store(out + off, wv.to(out.dtype.element_ty), mask=msk)


def dequantize_gpu(data, qtype, shape, out=None):
    """Packed weight (see `repack`) of logical shape [N, K] -> bf16 [N, K] (or into `out`)."""
    N, K = shape
    assert data.numel() == N * packed_row_bytes(qtype, K)
    if out is None:
        out = torch.empty(N, K, dtype=torch.bfloat16, device=data.device)
    BR, G = (16, 16) if not INTERPRET else (8, 16)
    grid = (triton.cdiv(N, BR), triton.cdiv(K, 16 * G))
    _dequant_kernel[grid](data, out, N, K, out.stride(0), QT=QT_ID[qtype], BR=BR, G=G)
    return out


@triton.jit
def _embed_kernel(ids, w, out, N, K, stride_on, QT: tl.constexpr, G: tl.constexpr):
    """Program (t, g): row ids[t] of the packed [N, K] table at the 16-groups g * G .. + G -> out[t]."""
    i_t, i_g = tl.program_id(0), tl.program_id(1)
    n = tl.load(ids + i_t + tl.arange(0, 1)).to(tl.int64)  # [1]
    gg = i_g * G + tl.arange(0, G)
    q, A, B = _dq_tile(w, n, n < N, gg, N, K, QT)
    wv = q * A[:, :, None] - B[:, :, None]  # [1, G, 16]
    off = i_t * stride_on + (gg * 16)[None, :, None] + tl.arange(0, 16)[None, None, :]
    tl.store(out + off, wv.to(out.dtype.element_ty), mask=(gg * 16 < K)[None, :, None])


def embed_gpu(ids, data, qtype, shape, out=None, dtype=torch.bfloat16):
    """Rows ids [T] (int, on data's device; each in [0, N)) of the packed table `data` (see `repack`) of
    logical shape [N, K] -> [T, K] in one launch (graph-capturable with `out`): the decode step's embedding
    without the gather + torch dequantize chain (7 launches, ~22 us per token on an H200, session 8)."""
    N, K = shape
    T = ids.numel()
    assert data.numel() == N * packed_row_bytes(qtype, K) and ids.is_contiguous()
    if INTERPRET and out is None and dtype != torch.float32:  # the interpreter truncates fp32 -> bf16: round in torch
        return embed_gpu(ids, data, qtype, shape, dtype=torch.float32).to(dtype)
    out = torch.empty(T, K, dtype=dtype, device=data.device) if out is None else out
    assert out.shape == (T, K) and out.stride(1) == 1
    G = 16 if INTERPRET else 32
    _embed_kernel[(T, triton.cdiv(K, 16 * G))](ids, data, out, N, K, out.stride(0), QT=QT_ID[qtype], G=G,
                                                num_warps=1 if INTERPRET else 4)
    return out


# ----------------------------------------------------------------------------------------------
# Decode GEMV: y[m, n] = sum_k x[m, k] w[n, k], M <= 8, fp32 FMA (each weight dequantized once, used M times)


def _gemv_configs():
    if INTERPRET:
        return [triton.Config({"BN": 8, "G": 16}, num_warps=4)]
    return [triton.Config({"BN": bn, "G": g}, num_warps=nw)
            for bn, g, nw in [(8, 16, 4), (16, 16, 4), (32, 16, 4), (32, 8, 4), (64, 8, 8), (16, 16, 8),
                              (32, 16, 8), (64, 16, 8)]]


@triton.autotune(configs=_gemv_configs(), key=["N", "K", "MP", "QT"])
@triton.jit
def _qgemv_kernel(x, w, out, M, N, K, stride_xm, stride_xk, stride_om,
                  QT: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, G: tl.constexpr):
    i_n = tl.program_id(0)
    n = i_n * BN + tl.arange(0, BN).to(tl.int64)
    n_mask = n < N
    o_m = tl.arange(0, MP)
    acc = tl.zeros([BN, MP], tl.float32)
    for g0 in range(0, tl.cdiv(K, 16), G):
        gg = g0 + tl.arange(0, G)
        q, A, B = _dq_tile(w, n, n_mask, gg, N, K, QT)  # [BN, G, 16], [BN, G]
        k_off = (gg * 16)[:, None] + tl.arange(0, 16)[None, :]  # [G, 16]
        for m in tl.static_range(MP):
            b_x = tl.load(x + m * stride_xm + k_off * stride_xk, mask=k_off < K * (m < M),
                          other=0.0).to(tl.float32)
            s = tl.sum(q * b_x[None, :, :], axis=2)  # [BN, G]
            xs = tl.sum(b_x, axis=1)  # [G]
            r = tl.sum(A * s - B * xs[None, :], axis=1)  # [BN]
            acc += tl.where(o_m[None, :] == m, r[:, None], 0.0)
    tl.store(out + o_m[None, :] * stride_om + n[:, None], acc.to(out.dtype.element_ty),
             mask=n_mask[:, None] & (o_m[None, :] < M))


def qgemv(x, data, qtype, N, out=None, method="auto", **word_kw):
    """x [M <= 8, K] or [K] (any float dtype, any strides) -> [M, N] / [N] in x.dtype (or `out`,
    row-contiguous). method "auto": the word path (`qgemv1`) for M = 1 and a type in WORD_QTYPES,
    else "fma"; "fma": fp32 CUDA-core dot products on dequantized tiles; "dot": the GEMM kernel (tensor
    cores, M padded to its tile), for comparing at M = 4..8; "word": force the word path (M = 1).
    word_kw: tuning knobs of qgemv1 (BN, C, SPLIT, num_warps, num_stages)."""
    squeeze = x.dim() == 1
    x2 = x[None] if squeeze else x
    M, K = x2.shape
    assert M <= 8 and data.numel() == N * packed_row_bytes(qtype, K)
    if out is None:
        out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    o2 = out.view(M, N)
    assert o2.stride(1) == 1
    if method == "word" or (method == "auto" and M == 1 and qtype in WORD_QTYPES):
        assert M == 1
        qgemv1(x2[0], data, qtype, N, out=o2[0], **word_kw)
        return out
    if isinstance(word_kw.get("x8"), NormedX8):  # x is not what the buffer stands for: only the word path reads it
        raise ValueError(f"a normed x8 buffer needs the word path (M = 1, a type in {WORD_QTYPES}), not {qtype}")
    if method == "dot":
        qgemm(x2, data, qtype, N, out=o2)
        return out
    MP = max(1, triton.next_power_of_2(M))
    grid = lambda meta: (triton.cdiv(N, meta["BN"]),)  # noqa: E731
    _qgemv_kernel[grid](x2, data, o2, M, N, K, x2.stride(0), x2.stride(1), o2.stride(0),
                        QT=QT_ID[qtype], MP=MP)
    return out


# ----------------------------------------------------------------------------------------------
# M = 1 GEMV on 32-bit words ("word path"; Q4_K, Q5_K, Q6_K, Q8_0, Q3_K, Q2_K): the decode hot path.
#
# Why: the tile path above spends ~20 instructions per weight (per-element 64-bit addresses and masks,
# byte loads, cross-thread reductions every iteration), so it is issue-bound at 10-25% of HBM. Here each
# thread loads 16-byte vectors of packed words and turns every k-bit field into a float with ONE AND:
# `bits & (mask << s)` reinterpreted as fp32 is the denormal q * 2^(s - 149) (exact while the field sits
# below bit 23), and the FFMA against x * 2^(93 - s) gives q * x * 2^-56 exactly as q * x would round
# (scaling by powers of two is exact; FFMA handles denormals at full rate). Fields at bits >= 20 are
# reached through one shift per word. Per weight: ~1 AND + 1 FFMA (+ ~1 for Q6_K/Q5_K/Q3_K field merging:
# the high bits are OR-ed next to the low bits first, so every field is one AND; Q2_K needs no merging),
# plus per-thread x preparation shared by BN / 16 rows. Offsets of the lower bound (q - 32, q - 128,
# - 4 * (1 - hbit), mins) go through per-group sums of x. Valid for |x| < 2^34 (x * 2^93 stays finite)
# and products above ~2^-70 (smaller ones flush to zero: irrelevant at fp32 accumulation).
# Rows past N are clamped (loads stay in bounds, stores are masked); K chunks past the range are clamped
# and their contribution zeroed per [row, chunk] (no per-element masks).

_P93 = tl.constexpr(2.0 ** 93)
_P89 = tl.constexpr(2.0 ** 89)
_P85 = tl.constexpr(2.0 ** 85)
_P81 = tl.constexpr(2.0 ** 81)
_P77 = tl.constexpr(2.0 ** 77)
_P91 = tl.constexpr(2.0 ** 91)
_P87 = tl.constexpr(2.0 ** 87)
_P83 = tl.constexpr(2.0 ** 83)
_P79 = tl.constexpr(2.0 ** 79)
_PM56 = tl.constexpr(2.0 ** -56)
_P56 = tl.constexpr(2.0 ** 56)
WORD_QTYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
# 16-byte chunks of the main quant plane (qs / ql) per ggml block (per row) in the word path
CHUNKS_PER_BLOCK = {"Q8_0": 2, "Q6_K": 4, "Q5_K": 8, "Q4_K": 8, "Q3_K": 4, "Q2_K": 4}


@triton.jit
def _bf(v):
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _xg(x, sxk, base, ii, b: tl.constexpr, s: tl.constexpr):
    """x at elements base[c] + 4 * ii + b ([C, 4]), as fp32."""
    return tl.load(x + (base[:, None] + 4 * ii[None, :] + b) * sxk).to(tl.float32)


@triton.jit
def _h16(u16):
    # fp16 bits (uint32 holding 16 bits) -> fp32
    return u16.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _chunks(cb, c1, C: tl.constexpr, EVEN: tl.constexpr):
    """The C chunk ids of the word-path step at chunk cb; past the range (not EVEN) clamped to c1 - 1."""
    cg = cb + tl.arange(0, C)
    if not EVEN:
        cg = tl.minimum(cg, c1 - 1)
    return cg


@triton.jit
def _kq_chunk(cb, c1, n, NB, C: tl.constexpr, EVEN: tl.constexpr, CPB: tl.constexpr = 4):
    """The chunks of a step in a K-quant layout with CPB 16-byte chunks of the main plane per block, in pairs
    (Q6_K / Q3_K / Q2_K: 4, a pair per 128-value half; Q4_K / Q5_K: 8, a pair per 64 values): (chunk cg [C],
    block blk, pair index, chunk in the pair, row-block index rb [BN, C])."""
    cg = _chunks(cb, c1, C, EVEN)
    blk = cg // CPB
    pair = (cg // 2) % (CPB // 2)
    g = cg % 2
    rb = n[:, None] * NB + blk[None, :]
    return cg, blk, pair, g, rb


@triton.jit
def _add_part(acc, part, cb, c1, C: tl.constexpr, EVEN: tl.constexpr):
    """acc + part ([BN, C]), the clamped chunks' columns zeroed."""
    if EVEN:
        return acc + part
    return acc + tl.where((cb + tl.arange(0, C) < c1)[None, :], part, 0.0)


@triton.jit
def _wdot_q4k(x, sxk, w, n, N, K, c0, c1, BN: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr):
    NB = K // 256
    RW4 = K // 32  # 16-byte chunks per row (written as RW4 * 4 words: 16-byte alignment is visible)
    NBT = N * NB
    wq = tl.multiple_of(w.to(tl.pointer_type(tl.uint32)), 16)
    sc16 = (w + NBT * 128).to(tl.pointer_type(tl.uint16))
    m16 = (w + NBT * 136).to(tl.pointer_type(tl.uint16))
    dd32 = (w + NBT * 144).to(tl.pointer_type(tl.uint32))
    ii = tl.arange(0, 4)
    acc = tl.zeros([BN, C], tl.float32)
    for cb in range(c0, c1, C):
        cg = _chunks(cb, c1, C, EVEN)
        blk = cg // 8
        j = (cg // 2) % 4
        q = tl.load(wq + (((n[:, None] * RW4 + cg[None, :]) * 4)[:, :, None] + ii[None, None, :]))
        base = 32 * cg - 16 * (cg % 2)  # element of (word 0, byte 0, low nibble)
        xl0 = _xg(x, sxk, base, ii, 0, 0)
        xl1 = _xg(x, sxk, base, ii, 1, 0)
        xl2 = _xg(x, sxk, base, ii, 2, 0)
        xl3 = _xg(x, sxk, base, ii, 3, 0)
        xh0 = _xg(x, sxk, base + 32, ii, 0, 0)
        xh1 = _xg(x, sxk, base + 32, ii, 1, 0)
        xh2 = _xg(x, sxk, base + 32, ii, 2, 0)
        xh3 = _xg(x, sxk, base + 32, ii, 3, 0)
        t = q >> 12
        s_lo = _bf(q & 0xF) * (xl0 * _P93)[None]
        s_lo += _bf(q & 0xF00) * (xl1 * _P85)[None]
        s_lo += _bf(q & 0xF0000) * (xl2 * _P77)[None]
        s_lo += _bf(t & 0xF000) * (xl3 * _P81)[None]
        s_hi = _bf(q & 0xF0) * (xh0 * _P89)[None]
        s_hi += _bf(q & 0xF000) * (xh1 * _P81)[None]
        s_hi += _bf(t & 0xF00) * (xh2 * _P85)[None]
        s_hi += _bf(t & 0xF0000) * (xh3 * _P77)[None]
        xs_lo = tl.sum(xl0 + xl1 + xl2 + xl3, axis=1) * _PM56
        xs_hi = tl.sum(xh0 + xh1 + xh2 + xh3, axis=1) * _PM56
        rb = n[:, None] * NB + blk[None, :]
        scp = tl.load(sc16 + rb * 4 + j[None, :]).to(tl.int32)
        mp = tl.load(m16 + rb * 4 + j[None, :]).to(tl.int32)
        dd = tl.load(dd32 + rb)
        d = _h16(dd & 0xFFFF)
        dmin = _h16(dd >> 16)
        part = d * (_i2f(scp & 0xFF, 0.0) * tl.sum(s_lo, axis=2) + _i2f(scp >> 8, 0.0) * tl.sum(s_hi, axis=2)) \
            - dmin * (_i2f(mp & 0xFF, 0.0) * xs_lo[None, :] + _i2f(mp >> 8, 0.0) * xs_hi[None, :])
        acc = _add_part(acc, part, cb, c1, C, EVEN)
    return tl.sum(acc, axis=1) * _P56


@triton.jit
def _wdot_q5k(x, sxk, w, n, N, K, c0, c1, BN: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr):
    # Q4_K's nibbles plus a 5th bit per element from qh (bit `sub` of qh byte e % 32 for element e of
    # sub-block `sub`). A qs chunk (group j of the block, half h) holds sub-blocks 2j (low nibbles) and
    # 2j + 1 (high nibbles) at qh bytes 16h..16h+15: one 16-byte qh load, shifted right by 2j, puts
    # their 5th bits at bits 0 / 1 of every byte; they are OR-ed above the nibbles (bit 4 of each byte,
    # fields stay below bit 23 except byte 3, reached by a shift as in Q6_K) and each field is one AND.
    NB = K // 256
    RW4 = K // 32
    NBT = N * NB
    wq = tl.multiple_of(w.to(tl.pointer_type(tl.uint32)), 16)
    wh = tl.multiple_of((w + NBT * 128).to(tl.pointer_type(tl.uint32)), 16)
    sc16 = (w + NBT * 160).to(tl.pointer_type(tl.uint16))
    m16 = (w + NBT * 168).to(tl.pointer_type(tl.uint16))
    dd32 = (w + NBT * 176).to(tl.pointer_type(tl.uint32))
    ii = tl.arange(0, 4)
    acc = tl.zeros([BN, C], tl.float32)
    for cb in range(c0, c1, C):
        cg, blk, j, h, rb = _kq_chunk(cb, c1, n, NB, C, EVEN, 8)
        q = tl.load(wq + (((n[:, None] * RW4 + cg[None, :]) * 4)[:, :, None] + ii[None, None, :]))
        hw = tl.load(wh + (rb * 8 + (4 * h)[None, :])[:, :, None] + ii[None, None, :])
        hs = hw >> (2 * j).to(tl.uint32)[None, :, None]
        # bitselects: nibble in bits 0-3, its 5th bit in bit 4 (bits 5-7: other qh bits, masked later)
        v_lo = (q & 0x0F0F0F0F) | ((hs << 4) & 0xF0F0F0F0)
        v_hi = ((q >> 4) & 0x0F0F0F0F) | ((hs << 3) & 0xF0F0F0F0)
        base = 32 * cg - 16 * h
        xl0 = _xg(x, sxk, base, ii, 0, 0)
        xl1 = _xg(x, sxk, base, ii, 1, 0)
        xl2 = _xg(x, sxk, base, ii, 2, 0)
        xl3 = _xg(x, sxk, base, ii, 3, 0)
        xh0 = _xg(x, sxk, base + 32, ii, 0, 0)
        xh1 = _xg(x, sxk, base + 32, ii, 1, 0)
        xh2 = _xg(x, sxk, base + 32, ii, 2, 0)
        xh3 = _xg(x, sxk, base + 32, ii, 3, 0)
        s_lo = _sb(v_lo, 0x1F, xl0, xl1, xl2, xl3)
        s_hi = _sb(v_hi, 0x1F, xh0, xh1, xh2, xh3)
        xs_lo = _xs4(xl0, xl1, xl2, xl3)
        xs_hi = _xs4(xh0, xh1, xh2, xh3)
        scp = tl.load(sc16 + rb * 4 + j[None, :]).to(tl.int32)
        mp = tl.load(m16 + rb * 4 + j[None, :]).to(tl.int32)
        dd = tl.load(dd32 + rb)
        d = _h16(dd & 0xFFFF)
        dmin = _h16(dd >> 16)
        part = d * (_i2f(scp & 0xFF, 0.0) * s_lo + _i2f(scp >> 8, 0.0) * s_hi) \
            - dmin * (_i2f(mp & 0xFF, 0.0) * xs_lo[None, :] + _i2f(mp >> 8, 0.0) * xs_hi[None, :])
        acc = _add_part(acc, part, cb, c1, C, EVEN)
    return tl.sum(acc, axis=1) * _P56


@triton.jit
def _wdot_q8_0(x, sxk, w, n, N, K, c0, c1, BN: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr):
    NB = K // 32
    RW4 = K // 16
    wq = tl.multiple_of(w.to(tl.pointer_type(tl.uint32)), 16)
    dp = (w + N * K).to(tl.pointer_type(tl.float16))
    ii = tl.arange(0, 4)
    acc = tl.zeros([BN, C], tl.float32)
    for cb in range(c0, c1, C):
        cg = _chunks(cb, c1, C, EVEN)
        q = tl.load(wq + (((n[:, None] * RW4 + cg[None, :]) * 4)[:, :, None] + ii[None, None, :]))
        base = 16 * cg
        x0 = _xg(x, sxk, base, ii, 0, 0)
        x1 = _xg(x, sxk, base, ii, 1, 0)
        x2 = _xg(x, sxk, base, ii, 2, 0)
        x3 = _xg(x, sxk, base, ii, 3, 0)
        u = q ^ 0x80808080  # offset binary: byte + 128
        t = u >> 16
        s = _bf(u & 0xFF) * (x0 * _P93)[None]
        s += _bf(u & 0xFF00) * (x1 * _P85)[None]
        s += _bf(t & 0xFF) * (x2 * _P93)[None]
        s += _bf(t & 0xFF00) * (x3 * _P85)[None]
        xs = tl.sum(x0 + x1 + x2 + x3, axis=1) * (128.0 * _PM56)
        d = tl.load(dp + n[:, None] * NB + (cg // 2)[None, :]).to(tl.float32)
        part = d * (tl.sum(s, axis=2) - xs[None, :])
        acc = _add_part(acc, part, cb, c1, C, EVEN)
    return tl.sum(acc, axis=1) * _P56


@triton.jit
def _sb(v, M: tl.constexpr, x0, x1, x2, x3):
    """The M-masked field at bit 0 of each of the 4 bytes of v (M = 0x7 / 0x1F / 0x3F: 3-, 5-, 6-bit fields;
    higher bits ignored), dotted with x (scaled domain; byte 3 through one shift, below bit 23)."""
    s = _bf(v & M) * (x0 * _P93)[None]
    s += _bf(v & (M << 8)) * (x1 * _P85)[None]
    s += _bf(v & (M << 16)) * (x2 * _P77)[None]
    s += _bf((v >> 16) & (M << 8)) * (x3 * _P85)[None]
    return tl.sum(s, axis=2)


@triton.jit
def _xs4(x0, x1, x2, x3):
    return tl.sum(x0 + x1 + x2 + x3, axis=1) * _PM56


@triton.jit
def _q6_group(a0, a1, hw, k: tl.constexpr):
    """The words of 16-group k (0..3) of a Q6_K chunk, one 6-bit q per byte: low (k = 0, 1) or high (k = 2, 3)
    nibbles of the ql words a0 / a1, and two high bits from the qh words hw."""
    if k == 0:
        return (a0 & 0x0F0F0F0F) | ((hw << 4) & 0x30303030)
    elif k == 1:
        return (a1 & 0x0F0F0F0F) | ((hw << 2) & 0x30303030)
    elif k == 2:
        return ((a0 >> 4) & 0x0F0F0F0F) | (hw & 0x30303030)
    else:
        return ((a1 >> 4) & 0x0F0F0F0F) | ((hw >> 2) & 0x30303030)


@triton.jit
def _q3_group(qs, hm, k: tl.constexpr):
    """The words of 16-group k (0..3) of a Q3_K chunk, one 3-bit q per byte: bits 2k of the qs words and the
    high bit from the hmask words hm (bit k of each byte, already shifted to the chunk's half)."""
    if k == 0:
        return (qs & 0x03030303) | ((hm << 2) & 0x04040404)
    elif k == 1:
        return ((qs >> 2) & 0x03030303) | ((hm << 1) & 0x04040404)
    elif k == 2:
        return ((qs >> 4) & 0x03030303) | (hm & 0x04040404)
    else:
        return ((qs >> 6) & 0x03030303) | ((hm >> 1) & 0x04040404)


@triton.jit
def _wdot_q6k(x, sxk, w, n, N, K, c0, c1, BN: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr):
    NB = K // 256
    NBT = N * NB
    wl = tl.multiple_of(w.to(tl.pointer_type(tl.uint32)), 16)
    wh = tl.multiple_of((w + NBT * 128).to(tl.pointer_type(tl.uint32)), 16)
    scp = (w + NBT * 192).to(tl.pointer_type(tl.int8))
    dp = (w + NBT * 208).to(tl.pointer_type(tl.float16))
    ii = tl.arange(0, 4)
    acc = tl.zeros([BN, C], tl.float32)
    for cb in range(c0, c1, C):
        cg, blk, nh, g, rb = _kq_chunk(cb, c1, n, NB, C, EVEN)
        ol = (rb * 32 + (16 * nh + 4 * g)[None, :])[:, :, None] + ii[None, None, :]
        a0 = tl.load(wl + ol)
        a1 = tl.load(wl + ol + 8)
        hw = tl.load(wh + (rb * 16 + (8 * nh + 4 * g)[None, :])[:, :, None] + ii[None, None, :])
        base = 256 * blk + 128 * nh + 16 * g
        so = rb * 16 + (8 * nh + g)[None, :]
        d = tl.load(dp + rb).to(tl.float32)
        part = tl.zeros([BN, C], tl.float32)
        for k in tl.static_range(4):
            xb = base + 32 * k
            x0 = _xg(x, sxk, xb, ii, 0, 0)
            x1 = _xg(x, sxk, xb, ii, 1, 0)
            x2 = _xg(x, sxk, xb, ii, 2, 0)
            x3 = _xg(x, sxk, xb, ii, 3, 0)
            sk = _sb(_q6_group(a0, a1, hw, k), 0x3F, x0, x1, x2, x3)
            sc = tl.load(scp + so + 2 * k).to(tl.float32)
            part += sc * (sk - 32.0 * _xs4(x0, x1, x2, x3)[None, :])
        part = d * part
        acc = _add_part(acc, part, cb, c1, C, EVEN)
    return tl.sum(acc, axis=1) * _P56


@triton.jit
def _wdot_q3k(x, sxk, w, n, N, K, c0, c1, BN: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr):
    NB = K // 256
    NBT = N * NB
    wqs = tl.multiple_of(w.to(tl.pointer_type(tl.uint32)), 16)
    whm = tl.multiple_of((w + NBT * 64).to(tl.pointer_type(tl.uint32)), 16)
    scp = (w + NBT * 96).to(tl.pointer_type(tl.int8))
    dp = (w + NBT * 112).to(tl.pointer_type(tl.float16))
    ii = tl.arange(0, 4)
    acc = tl.zeros([BN, C], tl.float32)
    for cb in range(c0, c1, C):
        cg, blk, nh, g, rb = _kq_chunk(cb, c1, n, NB, C, EVEN)
        qs = tl.load(wqs + (rb * 16 + (8 * nh + 4 * g)[None, :])[:, :, None] + ii[None, None, :])
        hm = tl.load(whm + (rb * 8 + (4 * g)[None, :])[:, :, None] + ii[None, None, :])
        hm = hm >> (4 * nh).to(tl.uint32)[None, :, None]  # bit j of each byte: high bit of group j
        base = 256 * blk + 128 * nh + 16 * g
        so = rb * 16 + (8 * nh + g)[None, :]
        d = tl.load(dp + rb).to(tl.float32)
        part = tl.zeros([BN, C], tl.float32)
        for jj in tl.static_range(4):
            xb = base + 32 * jj
            x0 = _xg(x, sxk, xb, ii, 0, 0)
            x1 = _xg(x, sxk, xb, ii, 1, 0)
            x2 = _xg(x, sxk, xb, ii, 2, 0)
            x3 = _xg(x, sxk, xb, ii, 3, 0)
            sj = _sb(_q3_group(qs, hm, jj), 0x7, x0, x1, x2, x3)
            sc = tl.load(scp + so + 2 * jj).to(tl.float32)
            part += sc * (sj - 4.0 * _xs4(x0, x1, x2, x3)[None, :])
        part = d * part
        acc = _add_part(acc, part, cb, c1, C, EVEN)
    return tl.sum(acc, axis=1) * _P56


@triton.jit
def _s2(qs, t, x0, x1, x2, x3, M0: tl.constexpr, M1: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr):
    # the 2-bit fields at bits 2 * jj of the 4 bytes of qs (t = qs >> 16 for bytes 2 and 3; masks
    # M0 = 3 << 2 jj, M1 = M0 << 8, scales P0 = 2^(93 - 2 jj), P1 = 2^(85 - 2 jj)), dotted with x
    s = _bf(qs & M0) * (x0 * P0)[None]
    s += _bf(qs & M1) * (x1 * P1)[None]
    s += _bf(t & M0) * (x2 * P0)[None]
    s += _bf(t & M1) * (x3 * P1)[None]
    return tl.sum(s, axis=2)


@triton.jit
def _wdot_q2k(x, sxk, w, n, N, K, c0, c1, BN: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr):
    # Q3_K's element order without the high bit: a qs chunk (half nh of the block, g) holds 4 groups of
    # 16 (jj = 0..3, bits 2 jj of every byte). Every field is one AND of qs or of t = qs >> 16 (the
    # fields of bytes 2 and 3 would reach bit 23): ~1 AND + 1 FFMA per weight; per-group scale and min
    # nibbles (scale | min << 4) apply after the 16-wide sums, the mins through sums of x.
    NB = K // 256
    NBT = N * NB
    wqs = tl.multiple_of(w.to(tl.pointer_type(tl.uint32)), 16)
    scp = w + NBT * 64
    dd32 = (w + NBT * 80).to(tl.pointer_type(tl.uint32))
    ii = tl.arange(0, 4)
    acc = tl.zeros([BN, C], tl.float32)
    for cb in range(c0, c1, C):
        cg, blk, nh, g, rb = _kq_chunk(cb, c1, n, NB, C, EVEN)
        qs = tl.load(wqs + (rb * 16 + (8 * nh + 4 * g)[None, :])[:, :, None] + ii[None, None, :])
        t = qs >> 16
        base = 256 * blk + 128 * nh + 16 * g
        so = rb * 16 + (8 * nh + g)[None, :]
        pd = tl.zeros([BN, C], tl.float32)
        pm = tl.zeros([BN, C], tl.float32)
        for jj in tl.static_range(4):
            xb = base + 32 * jj
            x0 = _xg(x, sxk, xb, ii, 0, 0)
            x1 = _xg(x, sxk, xb, ii, 1, 0)
            x2 = _xg(x, sxk, xb, ii, 2, 0)
            x3 = _xg(x, sxk, xb, ii, 3, 0)
            if jj == 0:
                sj = _s2(qs, t, x0, x1, x2, x3, 0x3, 0x300, _P93, _P85)
            elif jj == 1:
                sj = _s2(qs, t, x0, x1, x2, x3, 0xC, 0xC00, _P91, _P83)
            elif jj == 2:
                sj = _s2(qs, t, x0, x1, x2, x3, 0x30, 0x3000, _P89, _P81)
            else:
                sj = _s2(qs, t, x0, x1, x2, x3, 0xC0, 0xC000, _P87, _P79)
            sc = tl.load(scp + so + 2 * jj).to(tl.int32)
            pd += _i2f(sc & 15, 0.0) * sj
            pm += _i2f(sc >> 4, 0.0) * _xs4(x0, x1, x2, x3)[None, :]
        dd = tl.load(dd32 + rb)
        part = _h16(dd & 0xFFFF) * pd - _h16(dd >> 16) * pm
        acc = _add_part(acc, part, cb, c1, C, EVEN)
    return tl.sum(acc, axis=1) * _P56


@triton.jit
def _wdot(x, sxk, w, n, N, K, b0, b1, QT: tl.constexpr, BN: tl.constexpr, C: tl.constexpr,
          EVEN: tl.constexpr):
    """[BN] fp32: rows `n` (int32, in range) of the packed [N, K] matrix at `w`, dotted with x over
    ggml blocks [b0, b1) (blocks of 32 elements for Q8_0, 256 otherwise). Word path for Q8_0, Q6_K,
    Q5_K, Q4_K, Q3_K, Q2_K (C 16-byte chunks per row per step); the tile path for BF16 (whole K only)."""
    if QT == 3:
        return _wdot_q4k(x, sxk, w, n, N, K, b0 * 8, b1 * 8, BN, C, EVEN)
    elif QT == 2:
        return _wdot_q5k(x, sxk, w, n, N, K, b0 * 8, b1 * 8, BN, C, EVEN)
    elif QT == 5:
        return _wdot_q2k(x, sxk, w, n, N, K, b0 * 4, b1 * 4, BN, C, EVEN)
    elif QT == 0:
        return _wdot_q8_0(x, sxk, w, n, N, K, b0 * 2, b1 * 2, BN, C, EVEN)
    elif QT == 1:
        return _wdot_q6k(x, sxk, w, n, N, K, b0 * 4, b1 * 4, BN, C, EVEN)
    elif QT == 4:
        return _wdot_q3k(x, sxk, w, n, N, K, b0 * 4, b1 * 4, BN, C, EVEN)
    else:
        return _dq_dot_rows(x, sxk, w, n.to(tl.int64), n < N, N, K, QT, BN, 16)


# ----------------------------------------------------------------------------------------------
# Int8 activations ("x8"): the word path with x quantized to int8 per group of 16 values (symmetric,
# scale amax / 127), so that the inner products are dp4a (4 int8 multiply-adds in one instruction) on the
# weight words as loaded: per 8 Q4_K weights 2 LOP + 2 dp4a, against 8 LOP + 8 FFMA on fp x (ncu, H200,
# session 4: the fp word path issued ~8 instructions per weight and read at 23-35 % of DRAM bandwidth).
# The cost is the activation rounding (relative error ~0.3 %, far below the weights' own quantization
# error; ggml's CPU and CUDA dot products quantize activations the same way, per 32 values).
# An x8 buffer for a K-vector is int32 [x8_words(K)]: K/4 words of 4 int8 (element 4i + b in byte b),
# then K/16 fp32 scales dx, then K/16 fp32 sq = dx * (sum of the group's int8 values), which carries
# the weight offsets (Q6_K's -32, Q3_K's -4, the mins of Q4_K/Q5_K/Q2_K). Every 16-group of x meets
# exactly one weight sub-scale in every type (sub-blocks of 16 or 32, Q8_0 blocks of 32), so a group's
# integer sum is scaled once: part = d * sc * dx * isum - offset * sq.

X8_GROUP = 16
_INTERP_C = tl.constexpr(INTERPRET)


def x8_words(K):
    assert K % X8_GROUP == 0, f"K={K} is not a multiple of {X8_GROUP}"
    return K // 4 + 2 * (K // X8_GROUP)


# A "normed x8" buffer carries an RMSNorm whose 1 / rms the consumer applies: for h = rms_norm(x) * w it holds
# the x8 groups of x * w (not of h) and then K/16 more fp32 words, each group's sum of x^2. h = r * (x * w) with
# the scalar r = rsqrt(mean(x^2) + eps), so a GEMV of h is r times the GEMV of x * w, and every 16-group of the
# buffer can be written by whichever program produced those 16 values of x (the MoE down kernel's last arrival
# for a d-tile: the residual add + norm need no launch and no grid-wide reduction of their own). The consumer
# (_qgemv1_kernel with NORM) sums the K/16 squares itself. Roundings differ from rms_norm's (h is not rounded to
# bf16 before quantizing): within the x8 rounding, which is ~0.3 %.


def x8n_words(K):
    """Words of a normed x8 buffer (see above): the x8 buffer of x * w, then K/16 fp32 group sums of x^2."""
    return x8_words(K) + K // X8_GROUP


class NormedX8(NamedTuple):
    """A normed x8 buffer int32 [x8n_words(K)] and the norm's eps: qgemv1's x8 for h = rms_norm(x) * w."""
    buf: torch.Tensor
    eps: float


@triton.jit
def _dp4a(a, b):
    """Per 32-bit lane: the sum of the 4 products of the signed bytes of a and b (int32)."""
    a = a.to(tl.int32, bitcast=True)
    b = b.to(tl.int32, bitcast=True)
    if _INTERP_C:
        return (((a << 24) >> 24) * ((b << 24) >> 24) + ((a << 16) >> 24) * ((b << 16) >> 24)
                + ((a << 8) >> 24) * ((b << 8) >> 24) + (a >> 24) * (b >> 24))
    else:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, tl.zeros_like(a)],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _x8_quant(xf):
    """xf fp32 [G, 16] -> (words int32 [G, 4], dx [G], sq [G]) of the x8 format."""
    G: tl.constexpr = xf.shape[0]
    amax = tl.max(tl.abs(xf), axis=1)
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    q = tl.floor(xf * inv[:, None] + 0.5)  # integral, in [-127, 127]
    dx = amax / 127.0
    sq = dx * tl.sum(q, axis=1)
    qb = tl.reshape(q.to(tl.int32) & 0xFF, [G, 4, 4])
    words = tl.sum(qb << (8 * tl.arange(0, 4))[None, None, :], axis=2)  # disjoint bytes: sum == OR
    return words, dx, sq


@triton.jit
def _x8_store(x8, K, g, g_mask, words, dx, sq):
    """Store groups g ([G], masked) of an x8 buffer for a K-vector."""
    tl.store(x8 + (g * 4)[:, None] + tl.arange(0, 4)[None, :], words, mask=g_mask[:, None])
    fp = (x8 + K // 4).to(tl.pointer_type(tl.float32))
    tl.store(fp + g, dx, mask=g_mask)
    tl.store(fp + K // 16 + g, sq, mask=g_mask)


@triton.jit
def _x8_put(x8, K, g0, n, vals, G: tl.constexpr):
    """Quantize vals (fp32 [G * 16]) as 16-groups g0, g0 + 1, ... of the x8 buffer of a K-vector; only the
    first n of the G groups are stored."""
    words, dx, sq = _x8_quant(tl.reshape(vals, [G, 16]))
    g = tl.arange(0, G)
    _x8_store(x8, K, g0 + g, g < n, words, dx, sq)


@triton.jit
def _x8n_put(x8n, K, g0, n, xs, ws, G: tl.constexpr):
    """Groups g0 .. g0 + n - 1 (of G) of a normed x8 buffer from xs = x and ws = the norm weight (fp32 [G * 16]
    each, as rounded by the caller): the x8 groups of x * w and the groups' sums of x^2."""
    _x8_put(x8n, K, g0, n, xs * ws, G)
    g = tl.arange(0, G)
    ssp = (x8n + K // 4 + K // 8).to(tl.pointer_type(tl.float32))
    tl.store(ssp + g0 + g, tl.sum(tl.reshape(xs * xs, [G, 16]), axis=1), mask=g < n)


@triton.jit
def _res_norm_x8n(res, nw, x8n, K, d0, m, G: tl.constexpr):
    """A layer output's rows d0 .. d0 + 16 G - 1 (m fp32 [16 G], d0 a multiple of 16, rows past K ignored) into
    the residual stream and the next RMSNorm's normed x8 buffer: x = res + m (res's dtype: m rounded to it first,
    as a stored output would be; the add rounds once, as norm.rms_norm's), res <- x, and the groups of x8n from
    x and nw (rounded to res's dtype, as rms_norm rounds its weight)."""
    xdt = res.dtype.element_ty
    d = d0 + tl.arange(0, 16 * G)
    dm = d < K
    xs = (tl.load(res + d, mask=dm, other=0).to(tl.float32) + m.to(xdt).to(tl.float32)).to(xdt)
    tl.store(res + d, xs, mask=dm)
    ws = tl.load(nw + d, mask=dm, other=0).to(xdt).to(tl.float32)
    _x8n_put(x8n, K, d0 // 16, (K - d0) // 16, xs.to(tl.float32), ws, G)


@triton.jit
def _x8_kernel(x, sxk, x8, K, BG: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    g = tl.program_id(0) * BG + tl.arange(0, BG)
    g_mask = g < K // 16
    e = g[:, None] * 16 + tl.arange(0, 16)[None, :]
    xf = tl.load(x + e * sxk, mask=g_mask[:, None], other=0.0).to(tl.float32)
    words, dx, sq = _x8_quant(xf)
    _x8_store(x8, K, g, g_mask, words, dx, sq)


def quantize_x8(x, out=None):
    """x [K] (or [1, K]; any float dtype, any stride) -> its x8 buffer int32 [x8_words(K)] (see above).
    Graph-capturable, PDL-aware."""
    K = x.shape[-1]
    assert x.numel() == K
    if out is None:
        out = torch.empty(x8_words(K), dtype=torch.int32, device=x.device)
    assert out.numel() == x8_words(K) and out.dtype == torch.int32 and out.is_contiguous()
    xs = x.reshape(-1)
    BG = 64 if INTERPRET else 32
    _x8_kernel[(triton.cdiv(K // 16, BG),)](xs, xs.stride(0), out, K, BG=BG, PDL=pdl.enabled(), num_warps=1,
                                           **pdl.launch_kw())
    return out


def dequantize_x8(x8, K):
    """The fp32 [K] values an x8 buffer stands for (q * dx): what the x8 kernels multiply by."""
    q = x8[:K // 4].contiguous().view(torch.int8).float().view(-1, 16)
    dx = x8[K // 4:K // 4 + K // 16].view(torch.float32)
    return (q * dx[:, None]).reshape(K)


@triton.jit
def _x8_ptrs(x8, K):
    fp = (x8 + K // 4).to(tl.pointer_type(tl.float32))
    return x8, fp, fp + K // 16


@triton.jit
def _isum(v, xw, grp, ii):
    """[BN, C] int32: dp4a of weight words v [BN, C, 4] with the x8 words of 16-groups grp [C]."""
    xv = tl.load(xw + (grp * 4)[:, None] + ii[None, :])  # [C, 4]
    return tl.sum(_dp4a(v, tl.broadcast_to(xv[None, :, :], v.shape)), axis=2)


@triton.jit
def _i8dot_q45k(x8, w, n, N, K, c0, c1, BN: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr, Q5: tl.constexpr):
    # Q4_K (Q5: Q5_K). Chunk cg of a row: 4 words = 16 low nibbles (16-group gl of x) + 16 high nibbles
    # (group gl + 2); Q5_K adds the 5th bits of qh (see _wdot_q5k) at bit 4 of every byte. Planes (bytes
    # per block): qs 128, [qh 32,] sc 8, m 8, dd 4.
    NB = K // 256
    RW4 = K // 32
    NBT = N * NB
    P: tl.constexpr = 160 if Q5 else 128  # offset of the scale planes
    wq = tl.multiple_of(w.to(tl.pointer_type(tl.uint32)), 16)
    wh = tl.multiple_of((w + NBT * 128).to(tl.pointer_type(tl.uint32)), 16)
    sc16 = (w + NBT * P).to(tl.pointer_type(tl.uint16))
    m16 = (w + NBT * (P + 8)).to(tl.pointer_type(tl.uint16))
    dd32 = (w + NBT * (P + 16)).to(tl.pointer_type(tl.uint32))
    xw, dxp, sqp = _x8_ptrs(x8, K)
    ii = tl.arange(0, 4)
    acc = tl.zeros([BN, C], tl.float32)
    for cb in range(c0, c1, C):
        cg, blk, j, h, rb = _kq_chunk(cb, c1, n, NB, C, EVEN, 8)
        q = tl.load(wq + (((n[:, None] * RW4 + cg[None, :]) * 4)[:, :, None] + ii[None, None, :]))
        v_lo = q & 0x0F0F0F0F
        v_hi = (q >> 4) & 0x0F0F0F0F
        if Q5:
            hw = tl.load(wh + (rb * 8 + (4 * h)[None, :])[:, :, None] + ii[None, None, :])
            hs = hw >> (2 * j).to(tl.uint32)[None, :, None]
            v_lo = v_lo | ((hs << 4) & 0x10101010)
            v_hi = v_hi | ((hs << 3) & 0x10101010)
        gl = 2 * cg - h
        i_lo = _isum(v_lo, xw, gl, ii).to(tl.float32)
        i_hi = _isum(v_hi, xw, gl + 2, ii).to(tl.float32)
        scp = tl.load(sc16 + rb * 4 + j[None, :]).to(tl.int32)
        mp = tl.load(m16 + rb * 4 + j[None, :]).to(tl.int32)
        dd = tl.load(dd32 + rb)
        s_lo = _i2f(scp & 0xFF, 0.0) * tl.load(dxp + gl)[None, :] * i_lo
        s_hi = _i2f(scp >> 8, 0.0) * tl.load(dxp + gl + 2)[None, :] * i_hi
        m_lo = _i2f(mp & 0xFF, 0.0) * tl.load(sqp + gl)[None, :]
        m_hi = _i2f(mp >> 8, 0.0) * tl.load(sqp + gl + 2)[None, :]
        part = _h16(dd & 0xFFFF) * (s_lo + s_hi) - _h16(dd >> 16) * (m_lo + m_hi)
        acc = _add_part(acc, part, cb, c1, C, EVEN)
    return tl.sum(acc, axis=1)


@triton.jit
def _i8dot_q8_0(x8, w, n, N, K, c0, c1, BN: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr):
    return tl.sum(_q8_0_steps(x8, w, n, N, K, c0, c1, tl.zeros([BN, C], tl.float32), BN, C, EVEN), axis=1)


@triton.jit
def _q8_0_planes(w, N, K):
    """(blocks a row NB, 16-byte chunks a row RW4, the weight words as uint32, the fp16 scales) of a packed Q8_0
    matrix [N, K]: qs [N, K] int8, then d [N, K / 32] fp16."""
    wq = tl.multiple_of(w.to(tl.pointer_type(tl.uint32)), 16)
    return K // 32, K // 16, wq, (w + N * K).to(tl.pointer_type(tl.float16))


@triton.jit
def _q8_0_steps(x8, w, n, N, K, c0, c1, acc, BN: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr):
    """acc [BN, C] plus the x8 Q8_0 dot products' steps over chunks [c0, c1), by column (reduced by the caller)."""
    # chunk cg = 16 int8 weights = x's 16-group cg; block (scale d) cg // 2
    NB, RW4, wq, dp = _q8_0_planes(w, N, K)
    xw, dxp, sqp = _x8_ptrs(x8, K)
    ii = tl.arange(0, 4)
    for cb in range(c0, c1, C):
        cg = _chunks(cb, c1, C, EVEN)
        q = tl.load(wq + (((n[:, None] * RW4 + cg[None, :]) * 4)[:, :, None] + ii[None, None, :]))
        s = _isum(q, xw, cg, ii).to(tl.float32) * tl.load(dxp + cg)[None, :]
        part = tl.load(dp + n[:, None] * NB + (cg // 2)[None, :]).to(tl.float32) * s
        acc = _add_part(acc, part, cb, c1, C, EVEN)
    return acc


@triton.jit
def _q8_0_steps2(x8, w, n, N, K, c0, c1, q, d, acc, BN: tl.constexpr, C: tl.constexpr):
    """_q8_0_steps over whole steps [c0, c1) (EVEN), double-buffered in registers: q [BN, C, 4] / d [BN, C] are the
    step at c0's weight words and fp32 scales (_q8_0_pre, the caller's), and each step first issues the next step's
    loads, then computes its own products: two steps' weights in flight per program instead of one. The same
    operations in the same order as _q8_0_steps: the same bits."""
    NB, RW4, wq, dp = _q8_0_planes(w, N, K)
    xw, dxp, sqp = _x8_ptrs(x8, K)
    ii = tl.arange(0, 4)
    for cb in range(c0, c1, C):
        cgn = cb + C + tl.arange(0, C)
        more = cgn < c1  # the last step loads nothing more
        qn = tl.load(wq + (((n[:, None] * RW4 + cgn[None, :]) * 4)[:, :, None] + ii[None, None, :]),
                     mask=more[None, :, None], other=0)
        dn = tl.load(dp + n[:, None] * NB + (cgn // 2)[None, :], mask=more[None, :], other=0).to(tl.float32)
        cg = cb + tl.arange(0, C)
        s = _isum(q, xw, cg, ii).to(tl.float32) * tl.load(dxp + cg)[None, :]
        acc = acc + d * s
        q, d = qn, dn
    return acc


@triton.jit
def _q8_0_pre(w, n, N, K, c0, c1, BN: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr):
    """PRELOAD (one step: c1 - c0 <= C): the weight words q [BN, C, 4] and fp32 scales d [BN, C] of _i8dot_q8_0's
    single step, loaded on their own (before the grid-dependency wait: no kernel writes weights)."""
    NB, RW4, wq, dp = _q8_0_planes(w, N, K)
    ii = tl.arange(0, 4)
    cg = _chunks(c0, c1, C, EVEN)
    q = tl.load(wq + (((n[:, None] * RW4 + cg[None, :]) * 4)[:, :, None] + ii[None, None, :]))
    return q, tl.load(dp + n[:, None] * NB + (cg // 2)[None, :]).to(tl.float32)


@triton.jit
def _q8_0_post(x8, q, d, K, c0, c1, C: tl.constexpr, EVEN: tl.constexpr):
    """The rest of _i8dot_q8_0's single step on _q8_0_pre's q and d (the same operations in the same order: equal
    bits to _i8dot_q8_0 with this C)."""
    return tl.sum(_q8_0_post_acc(x8, q, d, K, c0, c1, C, EVEN), axis=1)


@triton.jit
def _q8_0_post_acc(x8, q, d, K, c0, c1, C: tl.constexpr, EVEN: tl.constexpr):
    """_q8_0_post before its reduction: the step's [BN, C] partial sums by column."""
    xw, dxp, sqp = _x8_ptrs(x8, K)
    cg = _chunks(c0, c1, C, EVEN)
    s = _isum(q, xw, cg, tl.arange(0, 4)).to(tl.float32) * tl.load(dxp + cg)[None, :]
    return _add_part(tl.zeros(d.shape, tl.float32), d * s, c0, c1, C, EVEN)


@triton.jit
def _i8dot_q36k(x8, w, n, N, K, c0, c1, BN: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr, Q6: tl.constexpr):
    # Q6_K (Q6; element layout as _wdot_q6k: 4 groups of 16, k = 0..3 at elements base + 32 k, 6-bit q - 32) or
    # Q3_K (as _wdot_q3k: 4 groups of 16, k = 0..3, 3-bit q, high bit set = +4, - 4). Planes (bytes per block):
    # low bits PL, high bits PH, int8 scales 16, fp16 d.
    PL: tl.constexpr = 128 if Q6 else 64
    PH: tl.constexpr = 64 if Q6 else 32
    OFF: tl.constexpr = 32.0 if Q6 else 4.0  # the quants' zero point
    NB = K // 256
    NBT = N * NB
    wl = tl.multiple_of(w.to(tl.pointer_type(tl.uint32)), 16)
    wh = tl.multiple_of((w + NBT * PL).to(tl.pointer_type(tl.uint32)), 16)
    scp = (w + NBT * (PL + PH)).to(tl.pointer_type(tl.int8))
    dp = (w + NBT * (PL + PH + 16)).to(tl.pointer_type(tl.float16))
    xw, dxp, sqp = _x8_ptrs(x8, K)
    ii = tl.arange(0, 4)
    acc = tl.zeros([BN, C], tl.float32)
    for cb in range(c0, c1, C):
        cg, blk, nh, g, rb = _kq_chunk(cb, c1, n, NB, C, EVEN)
        if Q6:
            ol = (rb * 32 + (16 * nh + 4 * g)[None, :])[:, :, None] + ii[None, None, :]
            a0 = tl.load(wl + ol)
            a1 = tl.load(wl + ol + 8)
            hw = tl.load(wh + (rb * 16 + (8 * nh + 4 * g)[None, :])[:, :, None] + ii[None, None, :])
        else:
            qs = tl.load(wl + (rb * 16 + (8 * nh + 4 * g)[None, :])[:, :, None] + ii[None, None, :])
            hm = tl.load(wh + (rb * 8 + (4 * g)[None, :])[:, :, None] + ii[None, None, :])
            hm = hm >> (4 * nh).to(tl.uint32)[None, :, None]
        g0 = 16 * blk + 8 * nh + g  # x's 16-group of k = 0; k adds 2 k
        so = rb * 16 + (8 * nh + g)[None, :]
        part = tl.zeros([BN, C], tl.float32)
        for k in tl.static_range(4):
            if Q6:
                v = _q6_group(a0, a1, hw, k)
            else:
                v = _q3_group(qs, hm, k)
            gk = g0 + 2 * k
            sk = _isum(v, xw, gk, ii).to(tl.float32) * tl.load(dxp + gk)[None, :]
            part += tl.load(scp + so + 2 * k).to(tl.float32) * (sk - OFF * tl.load(sqp + gk)[None, :])
        part = tl.load(dp + rb).to(tl.float32) * part
        acc = _add_part(acc, part, cb, c1, C, EVEN)
    return tl.sum(acc, axis=1)


@triton.jit
def _i8dot_q2k(x8, w, n, N, K, c0, c1, BN: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr):
    # element layout as _wdot_q2k: 4 groups of 16 (jj = 0..3, bits 2 jj of every byte); scale | min << 4
    NB = K // 256
    NBT = N * NB
    wqs = tl.multiple_of(w.to(tl.pointer_type(tl.uint32)), 16)
    scp = w + NBT * 64
    dd32 = (w + NBT * 80).to(tl.pointer_type(tl.uint32))
    xw, dxp, sqp = _x8_ptrs(x8, K)
    ii = tl.arange(0, 4)
    acc = tl.zeros([BN, C], tl.float32)
    for cb in range(c0, c1, C):
        cg, blk, nh, g, rb = _kq_chunk(cb, c1, n, NB, C, EVEN)
        qs = tl.load(wqs + (rb * 16 + (8 * nh + 4 * g)[None, :])[:, :, None] + ii[None, None, :])
        g0 = 16 * blk + 8 * nh + g
        so = rb * 16 + (8 * nh + g)[None, :]
        pd = tl.zeros([BN, C], tl.float32)
        pm = tl.zeros([BN, C], tl.float32)
        for jj in tl.static_range(4):
            gj = g0 + 2 * jj
            sj = _isum((qs >> (2 * jj)) & 0x03030303, xw, gj, ii).to(tl.float32) * tl.load(dxp + gj)[None, :]
            sc = tl.load(scp + so + 2 * jj).to(tl.int32)
            pd += _i2f(sc & 15, 0.0) * sj
            pm += _i2f(sc >> 4, 0.0) * tl.load(sqp + gj)[None, :]
        dd = tl.load(dd32 + rb)
        part = _h16(dd & 0xFFFF) * pd - _h16(dd >> 16) * pm
        acc = _add_part(acc, part, cb, c1, C, EVEN)
    return tl.sum(acc, axis=1)


@triton.jit
def _i8dot(x8, w, n, N, K, b0, b1, QT: tl.constexpr, BN: tl.constexpr, C: tl.constexpr, EVEN: tl.constexpr):
    """_wdot with an x8 buffer for x (word-path types only): [BN] fp32 over ggml blocks [b0, b1)."""
    if QT == 3 or QT == 2:
        return _i8dot_q45k(x8, w, n, N, K, b0 * 8, b1 * 8, BN, C, EVEN, QT == 2)
    elif QT == 5:
        return _i8dot_q2k(x8, w, n, N, K, b0 * 4, b1 * 4, BN, C, EVEN)
    elif QT == 0:
        return _i8dot_q8_0(x8, w, n, N, K, b0 * 2, b1 * 2, BN, C, EVEN)
    elif QT == 1:
        return _i8dot_q36k(x8, w, n, N, K, b0 * 4, b1 * 4, BN, C, EVEN, True)
    else:
        return _i8dot_q36k(x8, w, n, N, K, b0 * 4, b1 * 4, BN, C, EVEN, False)


@triton.jit
def _split_finish(y, out, part, cnt, n, N, i_n, i_s, SPLIT: tl.constexpr):
    """Store [BN] partial sums of split i_s; the last split to arrive for row tile i_n adds all
    SPLIT partials in a fixed order (deterministic), stores out, and re-arms the counter to 0."""
    n_mask = n < N
    if SPLIT == 1:
        tl.store(out + n, y.to(out.dtype.element_ty), mask=n_mask)
    else:
        tl.store(part + i_s * N + n, y, mask=n_mask)
        tl.debug_barrier()
        c = tl.atomic_add(cnt + i_n, 1, sem="acq_rel", scope="gpu")
        if c == SPLIT - 1:
            tot = tl.zeros_like(y)
            for s in range(SPLIT):
                tot += tl.load(part + s * N + n, mask=n_mask, other=0.0, cache_modifier=".cg")
            tl.store(out + n, tot.to(out.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(cnt + i_n, 0, sem="relaxed", scope="gpu")


@triton.jit
def _prefetch_rows(w, n, N, K, b0, b1, QT: tl.constexpr):
    """L2-prefetch the ggml blocks [b0, b1) of rows `n` of the packed matrix at `w`: one bulk request per
    row for each 16-byte-aligned plane (the quant bytes: ~90 % of the matrix); the small scale planes are
    read normally after the wait."""
    if QT == 0:
        NB = K // 32
    else:
        NB = K // 256
    NBT = N.to(tl.int64) * NB
    rb = n.to(tl.int64) * NB + b0  # [BN] first block of each row's slice
    nb = tl.zeros_like(n) + (b1 - b0)
    if QT == 0:  # Q8_0 qs 32
        prefetch_l2_bulk(w + rb * 32, nb * 32)
    elif QT == 1:  # Q6_K ql 128, qh 64, sc 16
        prefetch_l2_bulk(w + rb * 128, nb * 128)
        prefetch_l2_bulk(w + NBT * 128 + rb * 64, nb * 64)
    elif QT == 2:  # Q5_K qs 128, qh 32
        prefetch_l2_bulk(w + rb * 128, nb * 128)
        prefetch_l2_bulk(w + NBT * 128 + rb * 32, nb * 32)
    elif QT == 3:  # Q4_K qs 128
        prefetch_l2_bulk(w + rb * 128, nb * 128)
    elif QT == 4:  # Q3_K qs 64, hm 32, sc 16
        prefetch_l2_bulk(w + rb * 64, nb * 64)
        prefetch_l2_bulk(w + NBT * 64 + rb * 32, nb * 32)
    elif QT == 5:  # Q2_K qs 64, sc 16
        prefetch_l2_bulk(w + rb * 64, nb * 64)
        prefetch_l2_bulk(w + NBT * 64 + rb * 16, nb * 16)


@triton.jit
def _qgemv1_kernel(x, w, out, part, cnt, N, K, sxk, NBLK, BPS, eps,
                   QT: tl.constexpr, BN: tl.constexpr, C: tl.constexpr, SPLIT: tl.constexpr,
                   EVEN: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, X8: tl.constexpr,
                   NORM: tl.constexpr, BG: tl.constexpr, PRELOAD: tl.constexpr = False, FIRST: tl.constexpr = False,
                   PIPE: tl.constexpr = False):
    # X8: x is an x8 buffer (int8 activations, dp4a); else fp values with stride sxk. NORM: x is a normed x8
    # buffer (x8n_words) of K / 16 <= BG groups: the result is scaled by rsqrt(mean(x^2) + eps). PRELOAD (X8,
    # Q8_0, the K slice in one step): the slice's weights are loaded into registers before the PDL wait. FIRST (X8,
    # Q8_0, slices of whole steps, at least one): only the first step's weights before the wait, the rest after it.
    # PIPE (as FIRST): the steps double-buffered in registers (_q8_0_steps2), the first one's loads before the wait
    # if FIRST, else right after it
    i_n, i_s = tl.program_id(0), tl.program_id(1)
    n = i_n * BN + tl.arange(0, BN)
    b0 = i_s * BPS
    b1 = tl.minimum(b0 + BPS, NBLK)
    if PREFETCH:  # weights only: no kernel writes them (kernels/pdl.py)
        _prefetch_rows(w, tl.minimum(n, N - 1), N, K, b0, b1, QT)
    if PRELOAD:
        b_q, b_d = _q8_0_pre(w, tl.minimum(n, N - 1), N, K, b0 * 2, b1 * 2, BN, C, EVEN)
    if FIRST:
        b_q, b_d = _q8_0_pre(w, tl.minimum(n, N - 1), N, K, b0 * 2, b0 * 2 + C, BN, C, True)
    if PDL:  # x, the partials and the counters belong to earlier kernels until this returns
        gdc_wait()
        gdc_launch_dependents()
    if NORM:  # the groups' sums of squares: loads issued before the dot products, summed after them
        o_g = tl.arange(0, BG)
        b_ss = tl.load((x + K // 4 + K // 8).to(tl.pointer_type(tl.float32)) + o_g, mask=o_g < K // 16, other=0.0)
    if PRELOAD:
        y = _q8_0_post(x, b_q, b_d, K, b0 * 2, b1 * 2, C, EVEN)
    elif PIPE:
        if not FIRST:
            b_q, b_d = _q8_0_pre(w, tl.minimum(n, N - 1), N, K, b0 * 2, b0 * 2 + C, BN, C, True)
        y = tl.sum(_q8_0_steps2(x, w, tl.minimum(n, N - 1), N, K, b0 * 2, b1 * 2, b_q, b_d,
                                tl.zeros([BN, C], tl.float32), BN, C), axis=1)
    elif FIRST:  # _i8dot_q8_0's steps, the first one on the preloaded words: the same operations, the same bits
        acc = _q8_0_post_acc(x, b_q, b_d, K, b0 * 2, b0 * 2 + C, C, True)
        y = tl.sum(_q8_0_steps(x, w, tl.minimum(n, N - 1), N, K, b0 * 2 + C, b1 * 2, acc, BN, C, EVEN), axis=1)
    elif X8:
        y = _i8dot(x, w, tl.minimum(n, N - 1), N, K, b0, b1, QT, BN, C, EVEN)
    else:
        y = _wdot(x, sxk, w, tl.minimum(n, N - 1), N, K, b0, b1, QT, BN, C, EVEN)
    if NORM:
        y = y * tl.rsqrt(tl.sum(b_ss, 0) / K + eps)
    _split_finish(y, out, part, cnt, n, N, i_n, i_s, SPLIT)


_SPLIT_WS = {}
# L2 prefetch before the PDL wait only for matrices up to this size: chains of [1024, 2304] GEMVs ran
# 10-22 % faster with it, chains of 30 MB ([12288, 2304] Q6_K/Q8_0) and lm_head 10-35 % slower (H200,
# session 3, scripts/bench_kernels.py)
PREFETCH_MAX_BYTES = 12 << 20


def split_workspace(device, nparts, ntiles):
    """fp32 partials [nparts] and a zeroed int32 counter per row tile, cached per device and size
    (first use must be outside CUDA-graph capture; the kernels re-arm the counters themselves)."""
    key = (str(device), nparts, ntiles)
    if key not in _SPLIT_WS:
        _SPLIT_WS[key] = (torch.empty(max(1, nparts), dtype=torch.float32, device=device),
                          torch.zeros(max(1, ntiles), dtype=torch.int32, device=device))
    return _SPLIT_WS[key]


_WORD_C = {"Q4_K": 8, "Q5_K": 8, "Q8_0": 8, "Q6_K": 4, "Q3_K": 4, "Q2_K": 4}


def word_c(qtype, elems, pref=None):
    """(C, EVEN) for a K slice of `elems` elements: the largest power of two <= the preferred C that
    divides the slice's 16-byte chunk count (EVEN: no clamped chunks), else the preferred C (clamped).
    An explicit pref >= the slice's chunk count: one step over the whole slice (C = its next power of two)."""
    if qtype not in WORD_QTYPES:
        return 1, True
    c0 = pref or (8 if INTERPRET else _WORD_C[qtype])
    chunks = elems // QK[qtype] * CHUNKS_PER_BLOCK[qtype]
    if pref and chunks <= pref:  # an explicit C that covers the slice: all its loads in one step
        c = triton.next_power_of_2(chunks)
        return c, c == chunks
    c = c0
    while c > 1 and chunks % c:
        c //= 2
    if c >= max(1, c0 // 2) or chunks <= c0:
        return c, True
    return c0, False


def env_config(var, n):
    """n comma-separated ints from environment variable `var` (a config override for A/B runs), else None."""
    v = os.environ.get(var, "")
    if not v:
        return None
    vals = tuple(int(t) for t in v.split(","))
    if len(vals) != n:
        raise ValueError(f"{var}={v!r}: expected {n} comma-separated integers")
    return vals


def gemv1_config(qtype, N, K, x8=False):
    """Default (BN, C, SPLIT, num_warps, num_stages) of the M = 1 word path; C None = from word_c.
    Big N (lm_head): 128 rows per program (x preparation shared by 8 rows per thread), no split.
    Small N: 32 rows per program and split K until ~1024 programs, so that every program has only a
    few 16-byte loads per thread and they are all in flight at once (latency-bound sizes).
    x8 Q8_0 (KIMI_LOCAL_ONESTEP=0: off): lm_head 32 rows x 2 warps in 16-chunk steps, and the o-projection
    shape K slices of 16 chunks loaded in one step (session-5 sweep, scripts/sweep_gemv.py --onestep);
    x8 Q8_0 / Q6_K with N >= 2048 (lm_head included) and Q4_K / Q5_K below lm_head size (sessions 6, 7;
    KIMI_LOCAL_SMALL_BN=0: off): 4- / 2- / 4-row programs over whole rows, or 4 / 2 / 4 K slices past K = 2304
    (Q8_0 with the weights preloaded, preload_default: PRELOAD_SPLIT slices)."""
    if INTERPRET:
        return 32, None, 1, 4, 1
    nblk = K // QK[qtype]
    over = env_config("KIMI_LOCAL_GEMV_CFG", 4)  # "BN,C,SPLIT,warps" for every x8 GEMV but lm_head (A/B runs)
    if over and x8 and N < 65536:
        return over[0], over[1], min(over[2], nblk), over[3], 1
    onestep = x8 and qtype == "Q8_0" and os.environ.get("KIMI_LOCAL_ONESTEP", "1") != "0"
    # x8 Q8_0 in 4-row, 1-warp programs (KIMI_LOCAL_SMALL_BN=0: off): 3-12x more programs than 32-row ones
    # over K slices, each reading whole rows (K <= 2304) or 4 long slices (session-6 sweeps, scripts/sweep_gemv.py
    # --rows, H200, us): lm_head 100.4 vs 145.1 (94 % of HBM); [12288, 2304] 11.7 vs 16.8; [6144, 2304] 8.6 vs
    # 10.3; [2304, 4096] 6.9 vs 8.7; [2304, 9216] 11.4 vs 16.1. 8 rows: 127.2 (lm_head); 2 rows: 13.8 ([12288, 2304])
    small = (x8 and N >= 2048 and os.environ.get("KIMI_LOCAL_ONESTEP", "1") != "0"
             and os.environ.get("KIMI_LOCAL_SMALL_BN", "1") != "0")
    if small and qtype == "Q8_0":
        sp = preload_split()
        if preload_default(qtype, N, K, K // sp // 16):  # preloaded: fewer, longer slices (session 22)
            return 4, 16, sp, 1, 1
        return 4, 16, 1 if K <= 2304 else 4, 1, 1
    # x8 Q6_K (the Q2_K / Q3_K_M recipes' projections and lm_head) likewise, in 2-row programs (4 for lm_head):
    # [12288, 2304] 11.3 vs 17.4 us, [6144, 2304] 7.0 vs 11.2, [2304, 4096] 6.1 vs 9.6, lm_head 106.8 vs 157.5
    if small and qtype == "Q6_K":
        return (4, 16, 1, 1, 1) if N >= 65536 else (2, 16, 1 if K <= 2304 else 2, 1, 1)
    # x8 Q4_K / Q5_K (uniform Q4_K / Q5_K recipes) in 4-row programs (session 7, H200, us, Q4_K / Q5_K): [12288, 2304]
    # 9.8 vs 13.9 / 11.0 vs 15.5; [6144, 2304] 8.4 vs 10.0 / 9.0 vs 10.2; [9216, 2304] 9.0 vs 12.4 / 9.9 vs 13.6;
    # Q4_K [2304, 4096] with 4 K slices 5.7 vs 9.9. Not measured (unchanged): lm_head, Q5_K with K > 2304
    if small and N < 65536 and (qtype == "Q4_K" or (qtype == "Q5_K" and K <= 2304)):
        return 4, 16, 1 if K <= 2304 else 4, 1, 1
    if N >= 65536:
        if onestep:  # session-5 sweep (H200): lm_head Q8_0 x8 145.6 us at (32 rows, C=16, 2 warps) vs 196.4 below
            return 32, 16, 1, 2, 1
        if x8:  # session-4 sweep (H200): lm_head Q8_0 x8 196.4 us at 4 warps, 240.0 at 2 (fp default: 205.5)
            return 64, None, 1, 4, 1
        return 64, None, 1, 2, 1  # session-2 sweep (H100): lm_head Q8_0 225 us vs 231 us at (128, 4 warps)
    BN = 32
    tiles = triton.cdiv(N, BN)
    if onestep and N <= 4096 and 2048 < K <= 4096 and nblk % 8 == 0:
        # the o-projections [2304, 4096]: K slices of 8 blocks (16 chunks) loaded in one step: 8.64 vs 11.45 us
        # (H200, session 5); the other engine shapes measured no better this way (kda_qkv, mla_q, dense_down)
        return BN, 16, nblk // 8, 1, 1
    split = max(1, min(nblk, triton.cdiv(1024, tiles)))
    # session-2 sweep over the engine's shapes (H100, cold weights): Q8_0 is fastest with 1 warp on every
    # shape (the decode step's Q8_0 GEMVs: 1,388 vs 1,659 us per token); the K-quants keep 2 warps
    return BN, None, split, 1 if qtype == "Q8_0" else 2, 1


def x8_default() -> bool:
    """Int8 activations (dp4a) on the word path unless KIMI_LOCAL_X8=0 (read at each call: graphs
    capture what was set when they were captured)."""
    return os.environ.get("KIMI_LOCAL_X8", "1") != "0"


PRELOAD_MAX_CHUNKS = 256  # [BN, 256, 4] words: 128 registers a thread at BN = 4, 1 warp (the o-projections' rows)
# K slices of a preloaded x8 Q8_0 GEMV with K > 2304 (the o-projections: 1, their whole rows of 4,096). H200, session
# 22, KDA step + o-projection chain (us a layer): 4 slices 12.31, 2 slices 10.44, 8 slices 15.15; 8 rows a program
# (4 slices) 11.43, 2 rows 14.69; run 8: 1 slice 10.0 against 2 slices' 10.3. Session 23, run 2 (engine, interleaved):
# 1 slice 691.4 / 589.1 tok/s at 4K / 128K against 683.9 / 582.9 with 2 (no preload: 665.7 / 570.8).
# KIMI_LOCAL_GEMV_PRELOAD_SPLIT=N for A/B runs (past 1, slices of at most PRELOAD_MAX_CHUNKS chunks are preloaded)
PRELOAD_SPLIT = 1


def preload_split() -> int:
    """PRELOAD_SPLIT, or KIMI_LOCAL_GEMV_PRELOAD_SPLIT (read at each call: a graph keeps what was set at capture)."""
    return int(os.environ.get("KIMI_LOCAL_GEMV_PRELOAD_SPLIT", PRELOAD_SPLIT))


@functools.lru_cache(maxsize=None)
def _sm90() -> bool:
    """A Hopper-class current GPU (PDL, where the preload was measured), not the interpreter."""
    return not INTERPRET and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def preload_default(qtype, N, K, slice_chunks) -> bool:
    """x8 Q8_0 GEMVs below lm_head size whose K slice is at most PRELOAD_MAX_CHUNKS 16-weight chunks (the [2304, 4096]
    o-projections' PRELOAD_SPLIT slices) load the slice's weights into registers before the PDL wait, in one step, so
    only x and the dot products come after it (the same bits with PDL off: one step either way). They follow the
    latency-bound KDA step / MLA combine, during which their weights now stream. H200, session 22, 4 K slices:
    o-projection chain 7.0 -> 5.5 us a GEMV (one step without the preload 6.4), KDA step + GEMV 13.7 -> 12.3 us (2
    slices, PRELOAD_SPLIT: 10.4); engine with 2 slices (run 7) 680.9 / 580.4 / 296.1 tok/s at 4K / 128K / 1M against
    675.2 / 576.6 / 295.1 with 4 and 662.5 / 569.1 / 292.7 without the preload. KIMI_LOCAL_GEMV_PRELOAD=0: off (the
    4-step slices of 4 K slices, as before). Only on sm_90+ (_sm90, whether or not PDL is on: the same bits either
    way): elsewhere there is no PDL to overlap and the older configuration stays, as measured in earlier sessions.
    Only past K = 2304: the K = 2304 in-projections follow a short norm kernel, and preloading their whole rows (144
    chunks, in pieces of 128 + 16) made decode 5 % slower (session 23, run 1). KIMI_LOCAL_GEMV_PRELOAD_MAX=N: another
    PRELOAD_MAX_CHUNKS (A/B runs)."""
    return (os.environ.get("KIMI_LOCAL_GEMV_PRELOAD", "1") != "0" and qtype == "Q8_0" and N < 65536
            and K > 2304 and slice_chunks <= int(os.environ.get("KIMI_LOCAL_GEMV_PRELOAD_MAX", PRELOAD_MAX_CHUNKS))
            and _sm90())


def qgemv1(x, data, qtype, N, out=None, BN=None, C=None, SPLIT=None, num_warps=None, num_stages=None, x8=None,
           preload=None, first=None, pipe=None):
    """M = 1 word-path GEMV: x [K] or [1, K] -> [N] / [1, N] (x.dtype, or `out`). Types in WORD_QTYPES;
    others go to the tile path. Tuning knobs default to gemv1_config().
    x8: an int32 tensor = x's x8 buffer, already made (x then only gives K, dtype and shape): dp4a; True =
    quantize x here (quantize_x8, one more launch); False / None = fp x (KIMI_LOCAL_X8=0 makes the engine
    pass no buffer); a NormedX8 = the normed x8 buffer of an RMSNorm's input (see x8n_words): the result is
    scaled by that norm's 1 / rms here. A GEMV alone gains too little from dp4a to pay for its own quantize launch
    (H200, session 4: 11.4 vs 12.2 us for [2304, 4096] Q8_0): the engine's norms write the buffer as they normalize.
    preload: PRELOAD (x8 Q8_0: the K slice's weights in registers before the PDL wait, one step over the slice);
    None = preload_default(), unless C is given. first: FIRST (x8 Q8_0 without PRELOAD, slices of whole steps: the
    first step's weights before the PDL wait, the same bits); None = below lm_head size on sm_90+ (_sm90, as the
    preload), unless KIMI_LOCAL_GEMV_PRELOAD_FIRST=0. It serves the in-projections (K = 2304, 9 steps of 16
    chunks), which follow the MoE down kernel: their programs that are resident before its end have their first
    step in flight at the wait.
    H200, session 23 (interleaved, tok/s at 4K / 128K / 1M): run 10 733.5 / 614.9 against 723.4 / 608.9; run 11
    731.1 / 612.5 / 299.4 against 723.7 / 607.1 / 293.6. The whole rows before the wait (144 chunks in registers)
    were 5 % slower (run 1), 3 or 2 longer steps after it 2.6-5.4 % slower (run 9).
    pipe: PIPE (x8 Q8_0 without PRELOAD, slices of at least two whole steps: each step issues the next one's loads
    before its own products, two steps in flight, the same bits); None = below lm_head size on sm_90+, unless
    KIMI_LOCAL_GEMV_PIPE=0. The K = 2304 GEMVs walk 9 steps of 16 chunks, each a DRAM round trip."""
    K = x.shape[-1]
    assert x.numel() == K and data.numel() == N * packed_row_bytes(qtype, K)
    if out is None:
        out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    assert out.is_contiguous()
    if qtype not in WORD_QTYPES:
        return qgemv(x, data, qtype, N, out=out, method="fma")
    assert data.numel() < 2 ** 31
    normed = isinstance(x8, NormedX8)
    if normed:
        x8, eps = x8
        assert x8.dtype == torch.int32 and x8.numel() == x8n_words(K) and x8.is_contiguous()
    use_x8 = isinstance(x8, torch.Tensor) or (x8 is True and K % X8_GROUP == 0)
    dBN, dC, dS, dW, dST = gemv1_config(qtype, N, K, x8=use_x8)
    BN, SPLIT = BN or dBN, SPLIT or dS
    num_warps, num_stages = num_warps or dW, num_stages or dST
    nblk = K // QK[qtype]
    SPLIT = max(1, min(SPLIT, nblk))
    bps = triton.cdiv(nblk, SPLIT)
    SPLIT = triton.cdiv(nblk, bps)
    tiles = triton.cdiv(N, BN)
    slice_chunks = bps * QK[qtype] // 16  # Q8_0: 16-weight chunks of a K slice
    if preload is None:
        preload = preload_default(qtype, N, K, slice_chunks) and C is None
    preload = bool(preload) and use_x8 and qtype == "Q8_0"
    if preload:  # the whole slice in one step, so its weights can be loaded before the wait
        C = max(C or 0, slice_chunks)
    C, even = word_c(qtype, bps * QK[qtype], C or dC)
    even = even and nblk % bps == 0
    if first is None:
        first = N < 65536 and _sm90() and os.environ.get("KIMI_LOCAL_GEMV_PRELOAD_FIRST", "1") != "0"
    first = bool(first) and not preload and use_x8 and qtype == "Q8_0" and even and slice_chunks >= C
    if pipe is None:
        pipe = N < 65536 and _sm90() and os.environ.get("KIMI_LOCAL_GEMV_PIPE", "1") != "0"
    pipe = bool(pipe) and not preload and use_x8 and qtype == "Q8_0" and even and slice_chunks >= 2 * C
    part, cnt = split_workspace(x.device, SPLIT * N if SPLIT > 1 else 0, tiles if SPLIT > 1 else 0)
    if use_x8:
        xs = x8 if isinstance(x8, torch.Tensor) else quantize_x8(x)
        assert xs.dtype == torch.int32 and xs.numel() == (x8n_words(K) if normed else x8_words(K))
    else:
        xs = x.reshape(-1)
    _qgemv1_kernel[(tiles, SPLIT)](xs, data, out, part, cnt, N, K, xs.stride(0), nblk, bps,
                                   float(eps) if normed else 0.0, QT=QT_ID[qtype],
                                   BN=BN, C=C, SPLIT=SPLIT, EVEN=even, PDL=pdl.enabled(),
                                   PREFETCH=pdl.prefetch() and data.numel() <= PREFETCH_MAX_BYTES, X8=use_x8,
                                   NORM=normed, BG=triton.next_power_of_2(max(K // X8_GROUP, 1)), PRELOAD=preload,
                                   FIRST=first, PIPE=pipe,
                                   num_warps=num_warps, num_stages=num_stages, **pdl.launch_kw())
    return out


# ----------------------------------------------------------------------------------------------
# Prefill GEMM with in-kernel dequant: bf16 tiles into tl.dot, fp32 accumulate


def _gemm_configs():
    if INTERPRET:
        return [triton.Config({"BM": 16, "BN": 16, "G": 4, "GROUP_M": 2}, num_warps=4)]
    return [triton.Config({"BM": bm, "BN": bn, "G": g, "GROUP_M": 8}, num_warps=nw, num_stages=ns)
            for bn, bm, g, nw, ns in [(128, 128, 4, 8, 3), (128, 256, 4, 8, 3), (128, 64, 4, 4, 3),
                                      (64, 128, 4, 4, 3), (64, 256, 4, 4, 3), (128, 32, 8, 4, 3)]]


@triton.jit
def _dot_wt(q, A, B, b_x, acc, DOT_F32: tl.constexpr):
    """acc [BN, BM] += (q * A - B) [BN, BK] @ b_x [BM, BK]^T, with q [BN, G, 16], A, B [BN, G].
    The weight tile is the dot's first operand: on sm_90 it stays in registers (wgmma's A operand)."""
    BN: tl.constexpr = q.shape[0]
    BK: tl.constexpr = q.shape[1] * 16
    wv = tl.reshape(q * A[:, :, None] - B[:, :, None], [BN, BK])
    if DOT_F32:
        return tl.dot(wv, tl.trans(b_x.to(tl.float32)), acc)
    return tl.dot(wv.to(tl.bfloat16), tl.trans(b_x.to(tl.bfloat16)), acc)


def m_bucket(M):
    """Autotuning key for a GEMM of M rows: the next power of two, so that a prompt of a new length
    reuses the configuration measured for its bucket instead of autotuning again."""
    return triton.next_power_of_2(max(int(M), 16))


@triton.autotune(configs=_gemm_configs(), key=["N", "K", "M_BUCKET", "QT"])
@triton.jit
def _qgemm_kernel(x, w, out, M, N, K, stride_xm, stride_xk, stride_om, M_BUCKET,
                  QT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr,
                  GROUP_M: tl.constexpr, DOT_F32: tl.constexpr):
    """out [M, N] = x [M, K] @ W^T, computed as its transpose acc [BN, BM] = W_tile @ x_tile^T so that the
    dequantized weight tile is the wgmma's register operand A (sm_90: no shared-memory round trip for it;
    the x tile is the shared-memory operand, pipelined by Triton). The next K step's scales (A, B of
    `_dq_ab`) are loaded one iteration ahead: they are too narrow for the async-copy pipeline, and a
    plain load in the same iteration would put one global-memory latency on every K step."""
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    gsz = min(n_m - first_m, GROUP_M)
    i_m = first_m + (pid % width) % gsz
    i_n = (pid % width) // gsz
    o_m = i_m * BM + tl.arange(0, BM).to(tl.int64)
    n = i_n * BN + tl.arange(0, BN).to(tl.int64)
    m_mask, n_mask = o_m < M, n < N
    acc = tl.zeros([BN, BM], tl.float32)
    A, B = _dq_ab(w, n, n_mask, tl.arange(0, G), N, K, QT)
    for g0 in range(0, tl.cdiv(K, 16), G):
        gg = g0 + tl.arange(0, G)
        A_next, B_next = _dq_ab(w, n, n_mask, gg + G, N, K, QT)  # zero past K
        k = g0 * 16 + tl.arange(0, G * 16)
        b_x = tl.load(x + o_m[:, None] * stride_xm + k[None, :] * stride_xk,
                      mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
        acc = _dot_wt(_dq_q(w, n, n_mask, gg, N, K, QT), A, B, b_x, acc, DOT_F32)
        A, B = A_next, B_next
    tl.store(out + o_m[None, :] * stride_om + n[:, None], acc.to(out.dtype.element_ty),
             mask=m_mask[None, :] & n_mask[:, None])


def qgemm(x, data, qtype, N, out=None, method="fused", scratch=None):
    """x [M, K] -> [M, N]. method "fused": in-kernel dequant + tl.dot; "cublas": dequantize into
    `scratch` (bf16 [N, K], allocated if None) then torch.matmul."""
    M, K = x.shape
    assert data.numel() == N * packed_row_bytes(qtype, K)
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    assert out.stride(1) == 1
    if method == "cublas":
        wd = dequantize_gpu(data, qtype, (N, K), out=scratch)
        xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
        if out.dtype == torch.bfloat16:
            torch.matmul(xb, wd.t(), out=out)
        else:
            out.copy_(xb @ wd.t())
        return out
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    _qgemm_kernel[grid](x, data, out, M, N, K, x.stride(0), x.stride(1), out.stride(0), m_bucket(M),
                        QT=QT_ID[qtype], DOT_F32=INTERPRET)
    return out


# From this many rows on, qlinear dequantizes into a scratch for cuBLAS instead of the in-kernel dequant GEMM.
# The crossover lies between 64 and 256 rows, by type (H200, session 14,
# scripts/bench_kernels.py, [M x 2304] x [4096, 2304]^T, us, fused / dequant + cuBLAS: Q4_K M=64 43.9 / 34.4,
# M=256 41.8 / 29.9, M=512 55.7 / 36.1; Q8_0 M=64 40.4 / 90.6, M=256 37.5 / 27.5, M=512 57.1 / 31.0).
GEMM_CUBLAS_MIN_M = 128


def qlinear(x, data, qtype, N, out=None, x8=None):
    """y = x @ W^T for x [..., K]; M <= 8 -> GEMV, else GEMM. x8: see qgemv1 (M = 1 only)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    M = x2.shape[0]
    o2 = None if out is None else out.view(M, N)
    if M <= 8:
        y = qgemv(x2, data, qtype, N, out=o2, **({} if x8 is None else {"x8": x8}))
    elif M >= GEMM_CUBLAS_MIN_M:
        y = qgemm(x2, data, qtype, N, out=o2, method="cublas")
    else:
        y = qgemm(x2, data, qtype, N, out=o2)
    return y.view(*lead, N) if out is None else out
