"""ggml quantization formats in pure torch: the project's oracle for the block byte layouts.

Every function works on whole tensors at once (CPU or CUDA, whichever holds the input): a row of
n values is n / block_size blocks of type_size bytes, laid out exactly as ggml's `block_*` structs
(little-endian, no padding). `dequantize` reproduces gguf-py's `gguf.quants.dequantize` bit for bit
(same fp32 operations in the same order); `quantize` uses llama.cpp-style error-minimising scale
searches for the K-quants and ggml's own rounding for Q8_0 / F16 / BF16.

Shapes in comments: B = number of blocks, S = sub-blocks per block, n = values per sub-block,
C = candidate scales tried per sub-block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

QK_K = 256  # values per K-quant super-block


@dataclass(frozen=True)
class QType:
    name: str
    ggml_id: int  # == gguf.GGMLQuantizationType value
    block_size: int  # values per block
    type_size: int  # bytes per block


QTYPES: dict[str, QType] = {
    q.name: q
    for q in (
        QType("F32", 0, 1, 4),
        QType("F16", 1, 1, 2),
        QType("Q4_0", 2, 32, 18),
        QType("Q4_1", 3, 32, 20),
        QType("Q5_0", 6, 32, 22),
        QType("Q5_1", 7, 32, 24),
        QType("Q8_0", 8, 32, 34),
        QType("Q2_K", 10, QK_K, 84),
        QType("Q3_K", 11, QK_K, 110),
        QType("Q4_K", 12, QK_K, 144),
        QType("Q5_K", 13, QK_K, 176),
        QType("Q6_K", 14, QK_K, 210),
        QType("BF16", 30, 1, 2),
    )
}

_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_GROUP_MAX_EPS = 1e-15  # below this a sub-block counts as all-zero (as in ggml)
# values quantized per step: bounds the [B, S, C, n] search temporaries (~6 MB each on CPU, near cache size;
# larger on a GPU to keep it busy)
_CHUNK_VALUES = {"cpu": 1 << 16, "cuda": 1 << 21}


def _qtype(qtype: str) -> QType:
    try:
        return QTYPES[qtype]
    except KeyError:
        raise ValueError(f"unknown quantization type {qtype!r}; known: {', '.join(QTYPES)}") from None


def row_nbytes(qtype: str, n: int) -> int:
    """Bytes taken by one row of n values."""
    q = _qtype(qtype)
    if n < 0 or n % q.block_size:
        raise ValueError(f"{qtype} rows must hold a multiple of {q.block_size} values, got {n}")
    return n // q.block_size * q.type_size


# ---- byte helpers (all little-endian) ----


def _unpack(b: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., m] -> uint8 [..., 8 // bits, m]; out[..., k, i] = bits k*bits.. of b[..., i]."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=b.device)
    return (b.unsqueeze(-2) >> shifts[:, None]) & ((1 << bits) - 1)


def _pack(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of _unpack: uint8 [..., 8 // bits, m] (each < 2**bits) -> uint8 [..., m]."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=v.device)
    return (v << shifts[:, None]).sum(dim=-2, dtype=torch.uint8)  # disjoint bits: sum == or


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 2] (an fp16 field) -> float32 [B, 1]."""
    return b.contiguous().view(torch.float16).float()


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [B, 1] -> uint8 [B, 2], rounded to nearest even like ggml's fp32 -> fp16."""
    return x.to(torch.float16).view(torch.uint8)


def _u8(q: torch.Tensor) -> torch.Tensor:
    """Integer-valued float levels (0..255) -> uint8."""
    return q.to(torch.uint8)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C roundf: round half away from zero, exact for every float32 (no x + 0.5 rounding trap)."""
    t = torch.trunc(x)
    return t + torch.sign(x) * ((x - t).abs() >= 0.5)


# ---- K-quant packed sub-block scales ----


def _unpack_k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12 scale bytes [B, 12] -> 6-bit (scale, min) pairs, each uint8 [B, 8].

    bytes 0-3: scale j (6 low bits) | high 2 bits of scale j+4
    bytes 4-7: min j   (6 low bits) | high 2 bits of min j+4
    bytes 8-11: low 4 bits of scale j+4 | low 4 bits of min j+4 << 4
    """
    b0, b1, b2 = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([b0 & 63, (b2 & 15) | ((b0 >> 6) << 4)], dim=1)
    mn = torch.cat([b1 & 63, (b2 >> 4) | ((b1 >> 6) << 4)], dim=1)
    return sc, mn


def _pack_k4_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 8] scales and mins (< 64) -> uint8 [B, 12]; inverse of _unpack_k4_scales."""
    b0 = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    b1 = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    b2 = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return torch.cat([b0, b1, b2], dim=1)


def _unpack_q3_scales(b: torch.Tensor) -> torch.Tensor:
    """Q3_K 12 scale bytes [B, 12] -> 16 6-bit scales (stored + 32) as uint8 [B, 16].

    scale i: low 4 bits = nibble i // 8 of byte i % 8; high 2 bits = bits 2*(i // 4) of byte 8 + i % 4.
    """
    low = _unpack(b[:, :8], 4).flatten(1)  # [B, 16]
    high = _unpack(b[:, 8:], 2).flatten(1)  # [B, 16]
    return low | (high << 4)


def _pack_q3_scales(s: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 16] (< 64) -> uint8 [B, 12]; inverse of _unpack_q3_scales."""
    low = _pack((s & 15).view(-1, 2, 8), 4)  # [B, 8]
    high = _pack((s >> 4).view(-1, 4, 4), 2)  # [B, 4]
    return torch.cat([low, high], dim=1)


# ---- dequantization: uint8 [B, type_size] -> float32 [B, block_size] ----
# The fp32 operations and their order copy gguf-py (itself ggml's): bit-exact results.


def _dq_q8_0(b):
    # 0:2 d (fp16) | 2:34 qs (int8)
    d = _f16(b[:, 0:2])
    x = b[:, 2:].contiguous().view(torch.int8).float()
    return x * d


def _dq_q4_0(b):
    # 0:2 d | 2:18 qs: value j in the low nibble of qs[j], value j+16 in the high nibble
    d = _f16(b[:, 0:2])
    q = _unpack(b[:, 2:18], 4).flatten(1).float() - 8
    return d * q


def _dq_q4_1(b):
    # 0:2 d | 2:4 m | 4:20 qs (as Q4_0)
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _unpack(b[:, 4:20], 4).flatten(1).float()
    return d * q + m


def _q5_values(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """qh uint8 [B, 4] (a little-endian uint32, bit j = 5th bit of value j), qs [B, 16] -> uint8 [B, 32]."""
    high = _unpack(qh, 1).transpose(1, 2).flatten(1)  # [B, 32]: bit j%8 of byte j//8
    return _unpack(qs, 4).flatten(1) | (high << 4)


def _dq_q5_0(b):
    # 0:2 d | 2:6 qh | 6:22 qs
    d = _f16(b[:, 0:2])
    q = _q5_values(b[:, 2:6], b[:, 6:22]).float() - 16
    return d * q


def _dq_q5_1(b):
    # 0:2 d | 2:4 m | 4:8 qh | 8:24 qs
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _q5_values(b[:, 4:8], b[:, 8:24]).float()
    return d * q + m


def _q2_values(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K low bits: qs uint8 [B, 64] -> [B, 256]; value 128h + 32k + l = bits 2k of qs[32h + l]."""
    return _unpack(qs.view(-1, 2, 32), 2).flatten(1)


def _dq_q2_k(b):
    # 0:16 scales (low nibble scale, high nibble min; one per 16 values) | 16:80 qs | 80:82 d | 82:84 dmin
    sc = b[:, 0:16]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (sc & 15).float())[:, :, None]  # [B, 16, 1]
    ml = (dmin * (sc >> 4).float())[:, :, None]
    q = _q2_values(b[:, 16:80]).view(-1, 16, 16).float()
    return (dl * q - ml).flatten(1)


def _dq_q3_k(b):
    # 0:32 hmask (bit k of byte l: 3rd bit of value 32k + l) | 32:96 qs (as Q2_K) | 96:108 scales | 108:110 d
    d = _f16(b[:, 108:110])
    sc = _unpack_q3_scales(b[:, 96:108]).float() - 32
    dl = (d * sc)[:, :, None]  # [B, 16, 1]
    low = _q2_values(b[:, 32:96]).float()
    high = _unpack(b[:, 0:32], 1).flatten(1).float()
    q = (low - 4 * (1 - high)).view(-1, 16, 16)  # a set bit means no -4 offset
    return (dl * q).flatten(1)


def _k4_scales(b):
    """Q4_K/Q5_K header: d*sc and dmin*m per 32-value sub-block, float32 [B, 8, 1] each."""
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _unpack_k4_scales(b[:, 4:16])
    return (d * sc.float())[:, :, None], (dmin * m.float())[:, :, None]


def _q4_k_values(qs: torch.Tensor) -> torch.Tensor:
    """qs uint8 [B, 128] -> [B, 256]; value 64g + 32h + l = nibble h of qs[32g + l]."""
    return _unpack(qs.view(-1, 4, 32), 4).flatten(1)


def _dq_q4_k(b):
    # 0:2 d | 2:4 dmin | 4:16 scales | 16:144 qs
    dl, ml = _k4_scales(b)
    q = _q4_k_values(b[:, 16:144]).view(-1, 8, 32).float()
    return (dl * q - ml).flatten(1)


def _dq_q5_k(b):
    # 0:2 d | 2:4 dmin | 4:16 scales | 16:48 qh (bit k of byte l: 5th bit of value 32k + l) | 48:176 qs
    dl, ml = _k4_scales(b)
    high = _unpack(b[:, 16:48], 1).flatten(1)
    q = (_q4_k_values(b[:, 48:176]) | (high << 4)).view(-1, 8, 32).float()
    return (dl * q - ml).flatten(1)


def _q6_values(ql: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """ql [B, 128], qh [B, 64] -> uint8 [B, 256] in 0..63.

    value 128h + 32k + l: low 4 bits = nibble k // 2 of ql[64h + 32(k % 2) + l], high 2 bits = bits 2k of qh[32h + l].
    """
    low = _unpack(ql.view(-1, 2, 64), 4).flatten(1)
    high = _unpack(qh.view(-1, 2, 32), 2).flatten(1)
    return low | (high << 4)


def _dq_q6_k(b):
    # 0:128 ql | 128:192 qh | 192:208 scales (int8, one per 16 values) | 208:210 d
    d = _f16(b[:, 208:210])
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    dl = (d * sc)[:, :, None]  # [B, 16, 1]
    q = (_q6_values(b[:, 0:128], b[:, 128:192]).float() - 32).view(-1, 16, 16)
    return (dl * q).flatten(1)


# ---- scale searches (torch.round rounds half to even, like ggml's nearest_int) ----


def _affine_search(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                   search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit x ~ scale * L - min with L in 0..nmax per sub-block (min >= 0), minimising sum(w * err^2).

    x, w: float32 [B, S, n] -> scale, min: float32 [B, S].
    Start from plain min/max; with search, also try inverse scales (nmax + rmin + rdelta*c) / (max - min),
    c = 0..nstep, refit scale and min by weighted least squares for each rounding, keep the best
    (llama.cpp's make_qkx2_quants idea, all candidates at once on an extra axis C).
    """
    lo = x.amin(dim=-1).clamp(max=0)  # [B, S]; the offset is never positive
    rng = x.amax(dim=-1) - lo
    flat = rng == 0
    rng = torch.where(flat, 1.0, rng)
    plain_scale = torch.where(flat, 0.0, rng / nmax)
    if not search:
        return plain_scale, -lo

    steps = torch.arange(nstep + 1, device=x.device, dtype=torch.float32)
    iscale = torch.cat([torch.full_like(steps[:1], float(nmax)), nmax + rmin + rdelta * steps])  # [C]; 0 = plain
    iscale = iscale / rng[..., None]  # [B, S, C]
    L = torch.round(iscale[..., None] * (x - lo[..., None])[..., None, :]).clamp_(0, nmax)  # [B, S, C, n]

    wc = w[..., None, :]
    wl = wc * L
    sw = w.sum(-1, keepdim=True)  # [B, S, 1]
    sx = (w * x).sum(-1, keepdim=True)
    sxx = (w * x * x).sum(-1, keepdim=True)
    sl = wl.sum(-1)  # [B, S, C]
    sll = (wl * L).sum(-1)
    sxl = (wl * x[..., None, :]).sum(-1)

    # weighted least squares for (scale, offset) per candidate; offset clamped to <= 0
    det = sw * sll - sl * sl
    ok = det > 0
    det = torch.where(ok, det, 1.0)
    scale = (sw * sxl - sx * sl) / det
    off = (sll * sx - sl * sxl) / det
    pos = off > 0
    scale = torch.where(pos, sxl / sll.clamp(min=1e-30), scale)
    off = torch.where(pos, 0.0, off)
    scale[..., 0] = plain_scale  # candidate 0 keeps the plain min/max fit, so the search never loses to it
    off[..., 0] = lo
    ok[..., 0] = True

    # sum w (scale*L + off - x)^2, expanded over the sums above
    err = (scale * scale * sll + 2 * scale * off * sl + off * off * sw
           - 2 * scale * sxl - 2 * off * sx + sxx)
    best = torch.where(ok, err, torch.inf).argmin(dim=-1, keepdim=True)  # [B, S, 1]
    return scale.gather(-1, best).squeeze(-1), -off.gather(-1, best).squeeze(-1)


def _symmetric_search(x: torch.Tensor, w: torch.Tensor, nmax: int, search: bool) -> torch.Tensor:
    """Fit x ~ scale * L with L in -nmax..nmax-1 per sub-block, maximising the explained sum(w*x*L)^2/sum(w*L^2).

    x, w: float32 [B, S, n] -> signed scale float32 [B, S]. The value of largest magnitude maps to -nmax
    (the side with one more level). With search, try inverse scales -(nmax + 0.1 c) / max, c = -9..9, and fit
    the scale by least squares (llama.cpp's make_qx_quants idea, candidates on an extra axis C).
    """
    idx = x.abs().argmax(dim=-1, keepdim=True)
    peak = x.gather(-1, idx).squeeze(-1)  # [B, S] signed value of largest magnitude
    zero = peak.abs() < _GROUP_MAX_EPS
    peak = torch.where(zero, 1.0, peak)
    if not search:
        return torch.where(zero, 0.0, peak / -nmax)

    c = torch.arange(-9, 10, device=x.device, dtype=torch.float32)
    iscale = -(nmax + 0.1 * c) / peak[..., None]  # [B, S, C]
    L = torch.round(iscale[..., None] * x[..., None, :]).clamp_(-nmax, nmax - 1)  # [B, S, C, n]
    wl = w[..., None, :] * L
    sxl = (wl * x[..., None, :]).sum(-1)  # [B, S, C]
    sll = (wl * L).sum(-1)
    ok = sll > 0
    sll = torch.where(ok, sll, 1.0)
    gain = torch.where(ok, sxl * sxl / sll, -1.0)
    best = gain.argmax(dim=-1, keepdim=True)
    scale = (sxl / sll).gather(-1, best).squeeze(-1)
    return torch.where(zero, 0.0, scale)


def _levels(x: torch.Tensor, d: torch.Tensor, lo: int, hi: int, dm: torch.Tensor | None = None) -> torch.Tensor:
    """Final integer levels for sub-block step d [B, S, 1] (and offset dm): clamp(round((x + dm) / d), lo, hi).

    A zero step gives level 0 (as ggml). Returns float [B, S, n].
    """
    nz = d != 0
    num = x if dm is None else x + dm
    q = torch.round(num / torch.where(nz, d, 1.0)).clamp_(lo, hi)
    return torch.where(nz, q, 0.0)


# ---- quantization: float32 [B, block_size] -> uint8 [B, type_size] ----


def _q_q8_0(x, search):
    # ggml quantize_row_q8_0_ref: d = absmax / 127, q = roundf(x / d) (as x * (1/d))
    d = x.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, 0.0, 1.0 / torch.where(d == 0, 1.0, d))
    q = _round_away(x * inv).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=1)


def _k_header(scale: torch.Tensor, mins: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """Quantize per-sub-block scales and mins [B, S] (>= 0) to bits-bit integers under fp16 super-scales.

    Returns (d, dmin) float32 [B, 1] as stored in fp16, and integer-valued sc, m float32 [B, S].
    """
    top = (1 << bits) - 1
    max_scale = scale.amax(dim=1, keepdim=True)
    max_min = mins.amax(dim=1, keepdim=True)
    sc = torch.round(scale * torch.where(max_scale > 0, top / max_scale, 0.0)).clamp_(0, top)
    m = torch.round(mins * torch.where(max_min > 0, top / max_min, 0.0)).clamp_(0, top)
    d = (max_scale / top).half().float()
    dmin = (max_min / top).half().float()
    return d, dmin, sc, m


def _error_weights(xs: torch.Tensor) -> torch.Tensor:
    """Per-value error weights [B, S, n]: rms of the sub-block + |x| (llama.cpp's Q4_K/Q5_K choice, used for every
    K-quant here: it favours large weights a little yet stays within ~2 % of the unweighted RMSE, whereas
    llama.cpp's x^2 for Q3_K loses to plain min/max on heavy-tailed weights; see docs/perf-notes.md)."""
    return (xs * xs).mean(dim=-1, keepdim=True).sqrt() + xs.abs()


def _affine_k(x, nsub, nmax, sbits, rmin, nstep, search):
    """Shared Q2_K/Q4_K/Q5_K quantizer. x [B, 256] -> (d, dmin [B, 1], sc, m [B, S], levels [B, 256])."""
    xs = x.view(-1, nsub, QK_K // nsub)  # [B, S, n]
    scale, mins = _affine_search(xs, _error_weights(xs), nmax, rmin, 0.1, nstep, search)
    d, dmin, sc, m = _k_header(scale, mins, sbits)
    levels = _levels(xs, (d * sc)[..., None], 0, nmax, (dmin * m)[..., None])
    return d, dmin, sc, m, levels.flatten(1)


def _q_q2_k(x, search):
    d, dmin, sc, m, q = _affine_k(x, 16, 3, 4, -0.5, 15, search)
    header = _u8(sc) | (_u8(m) << 4)  # [B, 16]
    qs = _pack(_u8(q).view(-1, 2, 4, 32), 2).flatten(1)  # [B, 64]
    return torch.cat([header, qs, _f16_bytes(d), _f16_bytes(dmin)], dim=1)


def _q_q4_k(x, search):
    d, dmin, sc, m, q = _affine_k(x, 8, 15, 6, -1.0, 20, search)
    qs = _pack(_u8(q).view(-1, 4, 2, 32), 4).flatten(1)  # [B, 128]
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_k4_scales(_u8(sc), _u8(m)), qs], dim=1)


def _q_q5_k(x, search):
    d, dmin, sc, m, q = _affine_k(x, 8, 31, 6, -0.5, 15, search)
    q = _u8(q)
    qh = _pack((q >> 4).view(-1, 8, 32), 1)  # [B, 32]
    qs = _pack((q & 15).view(-1, 4, 2, 32), 4).flatten(1)  # [B, 128]
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_k4_scales(_u8(sc), _u8(m)), qh, qs], dim=1)


def _symmetric_k(x, nmax, sbits, search):
    """Shared Q3_K/Q6_K quantizer: 16 sub-blocks of 16 with signed sbits-bit scales under one fp16 d.

    x [B, 256] -> d [B, 1], integer sub-block scales [B, 16] in -2^(sbits-1)..2^(sbits-1)-1,
    levels [B, 256] in -nmax..nmax-1.
    """
    xs = x.view(-1, 16, 16)
    scale = _symmetric_search(xs, _error_weights(xs), nmax, search)  # [B, 16]
    half = 1 << (sbits - 1)
    idx = scale.abs().argmax(dim=1, keepdim=True)
    peak = scale.gather(1, idx)  # [B, 1] signed sub-block scale of largest magnitude -> -half
    zero = peak.abs() < _GROUP_MAX_EPS
    inv = torch.where(zero, 0.0, -half / torch.where(zero, 1.0, peak))
    sc = torch.round(inv * scale).clamp_(-half, half - 1)
    d = torch.where(zero, 0.0, 1.0 / torch.where(zero, 1.0, inv)).half().float()
    levels = _levels(xs, (d * sc)[..., None], -nmax, nmax - 1)
    return d, sc, levels.flatten(1)


def _q_q3_k(x, search):
    d, sc, q = _symmetric_k(x, 4, 6, search)
    q = _u8(q + 4)  # 0..7
    hmask = _pack((q >> 2).view(-1, 8, 32), 1)  # [B, 32]
    qs = _pack((q & 3).view(-1, 2, 4, 32), 2).flatten(1)  # [B, 64]
    return torch.cat([hmask, qs, _pack_q3_scales(_u8(sc + 32)), _f16_bytes(d)], dim=1)


def _q_q6_k(x, search):
    d, sc, q = _symmetric_k(x, 32, 8, search)
    q = _u8(q + 32)  # 0..63; value 128h + 32k + l
    ql = _pack((q & 15).view(-1, 2, 2, 64), 4).flatten(1)  # [B, 128]: byte 64h + 32(k % 2) + l, nibble k // 2
    qh = _pack((q >> 4).view(-1, 2, 4, 32), 2).flatten(1)  # [B, 64]: byte 32h + l, bits 2k
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _f16_bytes(d)], dim=1)


_DEQUANT = {
    "Q8_0": _dq_q8_0, "Q4_0": _dq_q4_0, "Q4_1": _dq_q4_1, "Q5_0": _dq_q5_0, "Q5_1": _dq_q5_1,
    "Q2_K": _dq_q2_k, "Q3_K": _dq_q3_k, "Q4_K": _dq_q4_k, "Q5_K": _dq_q5_k, "Q6_K": _dq_q6_k,
}
_QUANT = {"Q8_0": _q_q8_0, "Q2_K": _q_q2_k, "Q3_K": _q_q3_k, "Q4_K": _q_q4_k, "Q5_K": _q_q5_k, "Q6_K": _q_q6_k}


def _bf16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [..., n] -> uint8 [..., 2n] like ggml_compute_fp32_to_bf16 (round to nearest even, NaN kept quiet)."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    h = torch.where(nan, (u >> 16) | 64, (u + 0x7FFF + ((u >> 16) & 1)) >> 16)
    return torch.stack([h & 255, h >> 8], dim=-1).to(torch.uint8).flatten(-2)


def quantize(x: torch.Tensor, qtype: str, *, search: bool = True) -> torch.Tensor:
    """float [..., n] -> uint8 [..., row_nbytes(qtype, n)], rows independent, on x's device.

    search=False replaces the K-quant scale searches by plain min/max (absmax) scales: faster, larger error;
    kept as the baseline that docs/perf-notes.md compares against. For F32 the result may be a view of x.
    """
    q = _qtype(qtype)
    n = x.shape[-1]
    nbytes = row_nbytes(qtype, n)
    x = x.float()
    if qtype == "F32":
        return x.contiguous().view(torch.uint8)
    if qtype == "F16":
        return x.half().contiguous().view(torch.uint8)
    if qtype == "BF16":
        return _bf16_bytes(x)
    if qtype not in _QUANT:
        raise NotImplementedError(f"{qtype} is dequantize-only here; quantize to one of {', '.join(_QUANT)}")
    blocks = x.reshape(-1, q.block_size)
    if blocks.shape[0] == 0:
        return torch.empty(*x.shape[:-1], nbytes, dtype=torch.uint8, device=x.device)
    step = max(1, _CHUNK_VALUES.get(x.device.type, 1 << 16) // q.block_size)
    out = torch.cat([_QUANT[qtype](chunk, search) for chunk in blocks.split(step)])
    return out.view(*x.shape[:-1], nbytes)


def dequantize(data: torch.Tensor, qtype: str, n: int | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., nbytes] ggml rows -> [..., n] values of dtype (computed in float32, bit-exact with gguf-py).

    n, when given, is checked against nbytes. F32 rows read as float32 come back as a view of data.
    """
    q = _qtype(qtype)
    if data.dtype != torch.uint8:
        raise ValueError(f"quantized data must be uint8, got {data.dtype}")
    nbytes = data.shape[-1]
    if nbytes % q.type_size:
        raise ValueError(f"{qtype} rows are whole {q.type_size}-byte blocks; got {nbytes} bytes per row")
    n_have = nbytes // q.type_size * q.block_size
    if n is not None and n != n_have:
        raise ValueError(f"{nbytes} bytes of {qtype} hold {n_have} values per row, not {n}")
    lead = data.shape[:-1]
    if qtype in _FLOAT_DTYPES:
        values = data.contiguous().view(_FLOAT_DTYPES[qtype])
    else:
        values = _DEQUANT[qtype](data.reshape(-1, q.type_size))
    return values.reshape(*lead, n_have).to(dtype)


class QTensor:
    """A quantized tensor: ggml rows (uint8 [*shape[:-1], row_nbytes(qtype, shape[-1])]) + type + logical shape."""

    def __init__(self, data: torch.Tensor, qtype: str, shape: tuple[int, ...]):
        shape = tuple(int(s) for s in shape)
        if len(shape) == 0:
            raise ValueError("QTensor needs at least one dimension")
        if qtype in _FLOAT_DTYPES and data.dtype == _FLOAT_DTYPES[qtype]:
            data = data.contiguous().view(torch.uint8)  # plain float tensor -> its bytes
        want = (*shape[:-1], row_nbytes(qtype, shape[-1]))
        if data.dtype != torch.uint8 or tuple(data.shape) != want:
            raise ValueError(f"{qtype} data for shape {shape} must be uint8 {want}, got {data.dtype} "
                             f"{tuple(data.shape)}")
        self.data = data
        self.qtype = qtype
        self.shape = shape

    @classmethod
    def from_float(cls, x: torch.Tensor, qtype: str) -> "QTensor":
        return cls(quantize(x, qtype), qtype, tuple(x.shape))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.qtype, self.shape[-1], dtype)

    def __getitem__(self, idx) -> "QTensor":
        """Index the leading dims shape[:-1] as a tensor of that shape would be (rows stay whole):
        q[e] is expert e of a [E, out, in] stack, q[..., r] is row r of every expert."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        data = self.data[(*idx, slice(None))]  # the trailing slice keeps the byte dim whole
        return QTensor(data, self.qtype, (*data.shape[:-1], self.shape[-1]))

    def to(self, device) -> "QTensor":
        return QTensor(self.data.to(device), self.qtype, self.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __repr__(self) -> str:
        return f"QTensor({self.qtype}, shape={self.shape}, device={self.device})"
