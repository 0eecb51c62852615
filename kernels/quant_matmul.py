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
import os

import torch
import triton
import triton.language as tl

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
    l16 = tl.arange(0, 16)
    k_mask = gg * 16 < K  # [G]
    mask2 = n_mask[:, None] & k_mask[None, :]  # [R, G]
    mask3 = mask2[:, :, None]
    l3 = l16[None, None, :]
    if QT == 6:  # BF16
        wb = w.to(tl.pointer_type(tl.bfloat16))
        off = n[:, None, None] * K + (gg * 16)[None, :, None] + l3
        q = tl.load(wb + off, mask=mask3, other=0.0).to(tl.float32)
        A = tl.full([1, 1], 1.0, tl.float32)
        B = tl.zeros([1, 1], tl.float32)
    elif QT == 0:  # Q8_0: qs [N*NB, 32], d [N*NB] fp16
        NBT = N.to(tl.int64) * (K // 32)
        off = n[:, None, None] * K + (gg * 16)[None, :, None] + l3
        v = tl.load(w + off, mask=mask3, other=128).to(tl.int32)
        q = _i2f(v ^ 0x80, 128.0)
        rb = n[:, None] * (K // 32) + (gg // 2)[None, :]
        d = tl.load(w.to(tl.pointer_type(tl.float16)) + NBT * 16 + rb, mask=mask2, other=0.0)
        A = d.to(tl.float32)
        B = tl.zeros([1, 1], tl.float32)
    else:
        NB = K // 256
        NBT = N.to(tl.int64) * NB
        g = gg % 16
        rb = n[:, None] * NB + (gg // 16)[None, :]  # [R, G] block index in the matrix
        rb3 = rb[:, :, None]
        half = (g % 2) * 16  # [G] which 16 of a 32-run
        if QT == 3 or QT == 2:  # Q4_K / Q5_K
            qs = tl.load(w + rb3 * 128 + ((g // 4) * 32 + half)[None, :, None] + l3, mask=mask3, other=0)
            sub = g // 2
            v = (qs.to(tl.int32) >> (4 * (sub % 2))[None, :, None]) & 0xF
            if QT == 3:
                o_sc = NBT * 128
            else:
                o_qh = NBT * 128
                qh = tl.load(w + o_qh + rb3 * 32 + half[None, :, None] + l3, mask=mask3, other=0)
                v = v | (((qh.to(tl.int32) >> sub[None, :, None]) & 1) << 4)
                o_sc = NBT * 160
            sc = tl.load(w + o_sc + rb * 8 + sub[None, :], mask=mask2, other=0).to(tl.float32)
            m = tl.load(w + o_sc + NBT * 8 + rb * 8 + sub[None, :], mask=mask2, other=0).to(tl.float32)
            dd = w.to(tl.pointer_type(tl.float16)) + (o_sc + NBT * 16) // 2 + rb * 2
            d = tl.load(dd, mask=mask2, other=0.0).to(tl.float32)
            dmin = tl.load(dd + 1, mask=mask2, other=0.0).to(tl.float32)
            q = _i2f(v, 0.0)
            A = d * sc
            B = dmin * m
        elif QT == 1:  # Q6_K
            c = (g // 2) % 4
            nh = g // 8
            ql = tl.load(w + rb3 * 128 + (nh * 64 + (c % 2) * 32 + half)[None, :, None] + l3,
                         mask=mask3, other=0)
            qh = tl.load(w + NBT * 128 + rb3 * 64 + (nh * 32 + half)[None, :, None] + l3,
                         mask=mask3, other=0)
            v = (ql.to(tl.int32) >> (4 * (c // 2))[None, :, None]) & 0xF
            v = v | (((qh.to(tl.int32) >> (2 * c)[None, :, None]) & 3) << 4)
            sc = tl.load((w + NBT * 192).to(tl.pointer_type(tl.int8)) + rb * 16 + g[None, :],
                         mask=mask2, other=0).to(tl.float32)
            d = tl.load((w + NBT * 208).to(tl.pointer_type(tl.float16)) + rb, mask=mask2,
                        other=0.0).to(tl.float32)
            q = _i2f(v, 32.0)
            A = d * sc
            B = tl.zeros([1, 1], tl.float32)
        else:  # Q3_K (4) / Q2_K (5): qs [64] first
            j = (g // 2) % 4
            nh = g // 8
            qs = tl.load(w + rb3 * 64 + (nh * 32 + half)[None, :, None] + l3, mask=mask3, other=0)
            v = (qs.to(tl.int32) >> (2 * j)[None, :, None]) & 3
            if QT == 4:
                hm = tl.load(w + NBT * 64 + rb3 * 32 + half[None, :, None] + l3, mask=mask3, other=0)
                v = v | (((hm.to(tl.int32) >> (g // 2)[None, :, None]) & 1) << 2)
                sc = tl.load((w + NBT * 96).to(tl.pointer_type(tl.int8)) + rb * 16 + g[None, :],
                             mask=mask2, other=0).to(tl.float32)
                d = tl.load((w + NBT * 112).to(tl.pointer_type(tl.float16)) + rb, mask=mask2,
                            other=0.0).to(tl.float32)
                q = _i2f(v, 4.0)
                A = d * sc
                B = tl.zeros([1, 1], tl.float32)
            else:
                sc = tl.load(w + NBT * 64 + rb * 16 + g[None, :], mask=mask2, other=0).to(tl.int32)
                dd = (w + NBT * 80).to(tl.pointer_type(tl.float16)) + rb * 2
                d = tl.load(dd, mask=mask2, other=0.0).to(tl.float32)
                dmin = tl.load(dd + 1, mask=mask2, other=0.0).to(tl.float32)
                q = _i2f(v, 0.0)
                A = d * (sc & 15).to(tl.float32)
                B = dmin * (sc >> 4).to(tl.float32)
    return q, A, B


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


def qgemv(x, data, qtype, N, out=None, method="fma"):
    """x [M <= 8, K] or [K] (any float dtype, any strides) -> [M, N] / [N] in x.dtype (or `out`,
    row-contiguous). method "fma": fp32 CUDA-core dot products; "dot": the GEMM kernel (tensor cores,
    M padded to its tile), for comparing at M = 4..8."""
    squeeze = x.dim() == 1
    x2 = x[None] if squeeze else x
    M, K = x2.shape
    assert M <= 8 and data.numel() == N * packed_row_bytes(qtype, K)
    if out is None:
        out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    o2 = out.view(M, N)
    assert o2.stride(1) == 1
    if method == "dot":
        qgemm(x2, data, qtype, N, out=o2)
        return out
    MP = max(1, triton.next_power_of_2(M))
    grid = lambda meta: (triton.cdiv(N, meta["BN"]),)  # noqa: E731
    _qgemv_kernel[grid](x2, data, o2, M, N, K, x2.stride(0), x2.stride(1), o2.stride(0),
                        QT=QT_ID[qtype], MP=MP)
    return out


# ----------------------------------------------------------------------------------------------
# Prefill GEMM with in-kernel dequant: bf16 tiles into tl.dot, fp32 accumulate


def _gemm_configs():
    if INTERPRET:
        return [triton.Config({"BM": 16, "BN": 16, "G": 4, "GROUP_M": 2}, num_warps=4)]
    cfgs = []
    for bm, bn, g, nw, ns in [(128, 128, 4, 8, 3), (128, 128, 8, 8, 2), (128, 64, 4, 4, 3),
                              (64, 128, 4, 4, 3), (64, 64, 8, 4, 3), (256, 128, 4, 8, 2),
                              (16, 64, 8, 4, 3), (32, 128, 8, 4, 3), (16, 128, 16, 4, 2)]:
        cfgs.append(triton.Config({"BM": bm, "BN": bn, "G": g, "GROUP_M": 8}, num_warps=nw, num_stages=ns))
    return cfgs


@triton.jit
def _dot_w(b_x, q, A, B, acc, DOT_F32: tl.constexpr):
    """acc [BM, BN] += b_x [BM, BK] @ (q * A - B)^T, with q [BN, G, 16]."""
    BN: tl.constexpr = q.shape[0]
    BK: tl.constexpr = q.shape[1] * 16
    wv = tl.reshape(q * A[:, :, None] - B[:, :, None], [BN, BK])
    if DOT_F32:
        return tl.dot(b_x.to(tl.float32), tl.trans(wv), acc)
    return tl.dot(b_x.to(tl.bfloat16), tl.trans(wv.to(tl.bfloat16)), acc)


@triton.autotune(configs=_gemm_configs(), key=["N", "K", "M", "QT"])
@triton.jit
def _qgemm_kernel(x, w, out, M, N, K, stride_xm, stride_xk, stride_om,
                  QT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr,
                  GROUP_M: tl.constexpr, DOT_F32: tl.constexpr):
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
    acc = tl.zeros([BM, BN], tl.float32)
    for g0 in range(0, tl.cdiv(K, 16), G):
        gg = g0 + tl.arange(0, G)
        k = g0 * 16 + tl.arange(0, G * 16)
        b_x = tl.load(x + o_m[:, None] * stride_xm + k[None, :] * stride_xk,
                      mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
        q, A, B = _dq_tile(w, n, n_mask, gg, N, K, QT)
        acc = _dot_w(b_x, q, A, B, acc, DOT_F32)
    tl.store(out + o_m[:, None] * stride_om + n[None, :], acc.to(out.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


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
    _qgemm_kernel[grid](x, data, out, M, N, K, x.stride(0), x.stride(1), out.stride(0),
                        QT=QT_ID[qtype], DOT_F32=INTERPRET)
    return out


# Below this many rows the in-kernel dequant GEMM wins over dequant-to-scratch + cuBLAS
# (scratch costs ~2.6 B/weight of extra traffic; set from scripts/bench_kernels.py results).
GEMM_CUBLAS_MIN_M = 2048


def qlinear(x, data, qtype, N, out=None):
    """y = x @ W^T for x [..., K]; M <= 8 -> GEMV, else GEMM."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    M = x2.shape[0]
    o2 = None if out is None else out.view(M, N)
    if M <= 8:
        y = qgemv(x2, data, qtype, N, out=o2)
    elif M >= GEMM_CUBLAS_MIN_M and out is None:
        y = qgemm(x2, data, qtype, N, method="cublas")
    else:
        y = qgemm(x2, data, qtype, N, out=o2)
    return y.view(*lead, N) if out is None else out
