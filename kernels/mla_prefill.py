"""Flash-attention forward for MLA prefill (spec 3.5a, decompressed multi-head form), in Triton.

A prefill chunk of T queries at absolute positions p0..p0+T-1 attends causally over latent cache rows
0..p0+T-1 (the chunk's own rows are already written). Keys/values are decompressed one key block
(<= `key_block` rows) at a time by ONE cuBLAS GEMM per block,

    kv[s, h, :] = c[s] @ [k_b[h] | v_b[h]^T]          c = latent[s, :R] (bf16)  ->  [S, H, Dn + Dv] bf16

(k_nope = kv[..., :Dn], v = kv[..., Dn:] are strided views, no copies), while the rope key part
k_pe = latent[s, R:] [S, Dr] is SHARED by all heads: the kernel reads it straight from the cache rows
(bf16 cache) and never expands it per head. Score per (query t, head h, key s):

    score = (q_nope[t, h] . k_nope[h, s] + q_pe[t, h] . k_pe[s]) * scale       (two tl.dot per tile)

Kernel `_mla_prefill_fwd`: one program = BM query rows of one head, looping over BN-row key tiles of one
key block; online softmax in fp32 in the log2 domain (scale * log2(e) folded into one multiply, exp2),
bf16 tensor-core operands, fp32 accumulators. The running state (unnormalised acc [T, H, Dv] fp32, row
max m and row sum l [T, H] fp32) is read and written by the kernel itself, so key blocks merge inside it
(no torch log-sum-exp merge): the first block starts from m = -inf, the last one writes the normalised
output (into the same fp32 buffer) and the natural-log LSE (into m's buffer). Causality comes from
absolute positions: the kernel takes the query start (p0) and the key block start; key tiles that every
query row of the program sees run unmasked, tiles straddling the diagonal (or the block end) run masked,
tiles past the program's last query are skipped.

Floor (H100 SXM, ~990 TFLOP/s dense bf16 tensor cores; H200 same chip): a chunk of T queries over P past
keys costs 2 * T * H * (P + T/2) * (Dn + Dr + Dv) FLOPs = 2 * 4096 * 32 * (131072 + 2048) * 320 = 11.2 TFLOP
at T = 4096, H = 32, P = 128K, i.e. >= 11.3 ms at peak (FA-style kernels reach 40-60 % of it), plus the
decompression GEMMs 2 * (P + T) * R * H * (Dn + Dv) = 1.1 TFLOP (>= 1.1 ms).

Shapes (the engine's layout): q [T, H, Dn + Dr] (nope | rope per head, any float dtype);
latent [cap, R + Dr] bf16 / fp32, or float8_e4m3fn with latent_scale [cap] fp32 (row = stored * scale);
k_b [H, R, Dn] (attn_k_b), v_b [H, Dv, R] (attn_v_b). Real model: H = 32, Dn = 128, Dr = 64, Dv = 128,
R = 512. Under TRITON_INTERPRET=1 (CPU tests) the dot operands are upcast to fp32 (the interpreter's
bf16 dot is wrong) and tiles are 16 x 16.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634

# Launch configurations. BM query rows x BN key rows per tile. Shared memory per pipeline stage at the real
# dims: K tile BN*128*2 + k_pe BN*64*2 + V BN*128*2 bytes (40 KB at BN = 64), plus the q tile BM*192*2
# (48 KB at BM = 128). Hopper (227 KB per block): BM = 128, BN = 64, 8 warps (two warpgroups of 64 rows),
# 2-3 stages. Ampere/Ada consumer cards (99 KB per block) need the smaller tiles; a launch that runs out
# of resources falls through to the next entry of its list (remembered per device).
CONFIGS = {
    "interp": [dict(BM=16, BN=16, num_warps=1, num_stages=1)],
    "sm90": [dict(BM=128, BN=64, num_warps=8, num_stages=3), dict(BM=128, BN=64, num_warps=8, num_stages=2),
             dict(BM=64, BN=64, num_warps=4, num_stages=2), dict(BM=64, BN=32, num_warps=4, num_stages=2)],
    "sm80": [dict(BM=128, BN=64, num_warps=8, num_stages=2), dict(BM=128, BN=32, num_warps=8, num_stages=2),
             dict(BM=64, BN=32, num_warps=4, num_stages=2), dict(BM=32, BN=32, num_warps=4, num_stages=1)],
}
# candidates for scripts/bench_prefill_attn.py (H100 / H200)
SWEEP = [dict(BM=128, BN=64, num_warps=8, num_stages=3), dict(BM=128, BN=64, num_warps=8, num_stages=2),
         dict(BM=128, BN=128, num_warps=8, num_stages=2), dict(BM=64, BN=64, num_warps=4, num_stages=3)]
_BAD: set = set()  # (device, config tuple) that failed to launch for resources


def _config_list(device) -> list[dict]:
    if _INTERP or device.type != "cuda":
        return CONFIGS["interp"]
    major, _ = torch.cuda.get_device_capability(device)
    return CONFIGS["sm90" if major >= 9 else "sm80"]


@triton.jit(do_not_specialize=["T", "S", "q_start", "k_start", "first", "last"])
def _mla_prefill_fwd(
    qn, qp,  # q_nope [T, H, DN], q_pe [T, H, DR] (strided views of q; last dim contiguous)
    kn, kp, v,  # k_nope [H, S, DN] (any head/row strides; head stride 0 = shared), k_pe [S, DR], v [H, S, DV]
    acc, m_buf, l_buf,  # running state: acc [T, H, DV] fp32 (contiguous), m / l [T, H] fp32 (contiguous)
    T, S, q_start, k_start, qk_scale,  # qk_scale = softmax scale * log2(e)
    first, last,  # int: 1 = start from an empty state / 1 = normalise into acc and write the LSE into m_buf
    s_qn_t, s_qn_h, s_qp_t, s_qp_h, s_kn_h, s_kn_s, s_kp_s, s_v_h, s_v_s,
    H: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    cdt = tl.float32 if UPCAST else tl.bfloat16
    o_m = pid_m * BM + tl.arange(0, BM)
    m_row = o_m < T
    o_dn = tl.arange(0, DN)
    o_dr = tl.arange(0, DR)
    o_dv = tl.arange(0, DV)
    o_n = tl.arange(0, BN)
    h64 = pid_h.to(tl.int64)

    b_qn = tl.load(qn + o_m[:, None] * s_qn_t + pid_h * s_qn_h + o_dn[None, :], mask=m_row[:, None], other=0).to(cdt)
    b_qp = tl.load(qp + o_m[:, None] * s_qp_t + pid_h * s_qp_h + o_dr[None, :], mask=m_row[:, None], other=0).to(cdt)

    # running state of these rows (first block: empty)
    i_st = o_m * H + pid_h  # [BM] row index into [T, H]
    m_ld = m_row & ((o_m * 0 + first) == 0)  # (a tensor compare: scalar bools do not mix with masks)
    b_m = tl.load(m_buf + i_st, mask=m_ld, other=float("-inf"))
    b_l = tl.load(l_buf + i_st, mask=m_ld, other=0.0)
    p_acc = acc + i_st[:, None] * DV + o_dv[None, :]
    b_acc = tl.load(p_acc, mask=m_ld[:, None], other=0.0)

    # key rows [0, n_vis) may be seen by some row of this program, [0, n_full) by all of its rows
    q_first = q_start + pid_m * BM
    q_last = q_start + tl.minimum(pid_m * BM + BM, T) - 1
    n_vis = tl.maximum(tl.minimum(q_last - k_start + 1, S), 0)
    n_full = tl.maximum(tl.minimum(q_first - k_start + 1, S), 0) // BN * BN

    p_kn = kn + h64 * s_kn_h + o_n[:, None] * s_kn_s + o_dn[None, :]  # [BN, DN] at key row 0
    p_kp = kp + o_n[:, None] * s_kp_s + o_dr[None, :]  # [BN, DR]
    p_v = v + h64 * s_v_h + o_n[:, None] * s_v_s + o_dv[None, :]  # [BN, DV]

    # past tiles: every row sees every key, no masks (pointers advance in 64-bit: no int32 overflow)
    for s0 in range(0, n_full, BN):
        b_kn = tl.load(p_kn).to(cdt)
        b_kp = tl.load(p_kp).to(cdt)
        b_s = tl.dot(b_qn, tl.trans(b_kn)) + tl.dot(b_qp, tl.trans(b_kp))  # [BM, BN] fp32
        b_mn = tl.maximum(b_m, tl.max(b_s, 1) * qk_scale)
        b_p = tl.exp2(b_s * qk_scale - b_mn[:, None])
        b_alpha = tl.exp2(b_m - b_mn)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_vv = tl.load(p_v).to(cdt)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(cdt), b_vv)
        b_m = b_mn
        p_kn += BN * s_kn_s
        p_kp += BN * s_kp_s
        p_v += BN * s_v_s

    # diagonal / block-end tiles: key (k_start + s) visible to query (q_start + t) iff k_start + s <= q_start + t
    q_pos = q_start + o_m
    for s0 in range(n_full, n_vis, BN):
        o_s = s0 + o_n
        m_s = o_s < S
        b_kn = tl.load(p_kn, mask=m_s[:, None], other=0).to(cdt)
        b_kp = tl.load(p_kp, mask=m_s[:, None], other=0).to(cdt)
        b_s = tl.dot(b_qn, tl.trans(b_kn)) + tl.dot(b_qp, tl.trans(b_kp))
        vis = ((k_start + o_s)[None, :] <= q_pos[:, None]) & m_s[None, :]
        b_s = tl.where(vis, b_s * qk_scale, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_mu = tl.where(b_mn == float("-inf"), 0.0, b_mn)  # rows that have seen nothing yet: no inf - inf
        b_p = tl.exp2(b_s - b_mu[:, None])
        b_alpha = tl.exp2(b_m - b_mu)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_vv = tl.load(p_v, mask=m_s[:, None], other=0).to(cdt)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(cdt), b_vv)
        b_m = b_mn
        p_kn += BN * s_kn_s
        p_kp += BN * s_kp_s
        p_v += BN * s_v_s

    if last != 0:
        b_lc = tl.where(b_l > 0, b_l, 1.0)
        tl.store(p_acc, b_acc / b_lc[:, None], mask=m_row[:, None])
        tl.store(m_buf + i_st, (b_m + tl.log2(b_lc)) * 0.6931471805599453, mask=m_row)  # natural-log LSE
    else:
        tl.store(p_acc, b_acc, mask=m_row[:, None])
        tl.store(m_buf + i_st, b_m, mask=m_row)
        tl.store(l_buf + i_st, b_l, mask=m_row)


def mla_attn_block(q_nope, q_pe, k_nope, k_pe, v, acc, m, l, q_start: int, k_start: int, scale: float,
                   first: bool, last: bool, config: dict | None = None):
    """One key block of causal attention merged into a running state, in place.

    q_nope [T, H, Dn], q_pe [T, H, Dr] (strided views of q fine; last dim contiguous); k_nope [H, S, Dn]
    (head stride 0 = shared); k_pe [S, Dr] shared by the heads (row stride free); v [H, S, Dv];
    acc [T, H, Dv] fp32, m, l [T, H] fp32, all contiguous. Query t is at absolute position q_start + t,
    key s at k_start + s; a key is visible iff its position <= the query's. first: ignore the state's
    contents (start empty); last: acc <- normalised output, m <- natural-log LSE per row (valid rows must
    have seen >= 1 key overall). config: dict(BM, BN, num_warps, num_stages); None = the device's list."""
    T, H, DN = q_nope.shape
    S, DR = k_pe.shape
    DV = v.shape[-1]
    for t in (q_nope, q_pe, k_nope, k_pe, v):
        assert t.stride(-1) == 1, "last dim must be contiguous"
    assert acc.is_contiguous() and m.is_contiguous() and l.is_contiguous()
    assert acc.shape == (T, H, DV) and m.shape == (T, H) and l.shape == (T, H)
    assert all(d & (d - 1) == 0 for d in (DN, DR, DV)), "head dims must be powers of two"
    dev = q_nope.device
    cands = [config] if config is not None else [c for c in _config_list(dev) if (str(dev), tuple(c.items())) not in _BAD]
    err = None
    for cfg in cands:
        BM, BN = cfg["BM"], cfg["BN"]
        try:
            _mla_prefill_fwd[(triton.cdiv(T, BM), H)](
                q_nope, q_pe, k_nope, k_pe, v, acc, m, l,
                T, S, q_start, k_start, scale * _LOG2E, int(first), int(last),
                q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
                k_nope.stride(0), k_nope.stride(1), k_pe.stride(0), v.stride(0), v.stride(1),
                H=H, DN=DN, DR=DR, DV=DV, BM=BM, BN=BN, UPCAST=_INTERP,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            return
        except triton.runtime.errors.OutOfResources as e:  # shared memory / registers: try the next one
            if config is not None:
                raise
            _BAD.add((str(dev), tuple(cfg.items())))
            err = e
    raise err if err is not None else RuntimeError("no launch configuration left")


def _kv_weight(k_b, v_b):
    """[R, H * (Dn + Dv)] bf16: per head [k_b[h] | v_b[h]^T], so c @ W = [S, H, Dn + Dv] in one GEMM."""
    H, R, Dn = k_b.shape
    w = torch.cat([k_b.to(torch.bfloat16), v_b.to(torch.bfloat16).transpose(1, 2)], -1)  # [H, R, Dn + Dv]
    return w.permute(1, 0, 2).reshape(R, -1)


def mla_prefill_attention(q, latent, latent_scale, k_b, v_b, p0: int, scale: float, key_block: int = 16384,
                          config: dict | None = None, out: torch.Tensor | None = None):
    """Causal MLA for a chunk of T queries at positions p0..p0+T-1 over latent rows 0..p0+T-1 (drop-in for
    kimi_local.engine.mla_prefill_attention). q [T, H, Dn+Dr]; latent [cap, R+Dr] (fp8 with latent_scale
    [cap]); k_b [H, R, Dn]; v_b [H, Dv, R]. Returns out [T, H, Dv] fp32 (contiguous; `out` may be given).
    Keys/values are decompressed <= key_block rows at a time (bf16, one GEMM per block); the Triton kernel
    merges the blocks through its running (acc, max, sum) state."""
    T, H, Dq = q.shape
    R, Dn = k_b.shape[1], k_b.shape[2]
    Dv = v_b.shape[1]
    Dr = Dq - Dn
    assert latent.shape[1] == R + Dr and T >= 1
    if q.stride(-1) != 1:
        q = q.contiguous()
    q_nope, q_pe = q[..., :Dn], q[..., Dn:]
    w = _kv_weight(k_b, v_b)
    if out is None:
        out = torch.empty(T, H, Dv, dtype=torch.float32, device=q.device)
    m = torch.empty(T, H, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    n = p0 + T
    starts = list(range(0, n, key_block))
    for i, a in enumerate(starts):
        b = min(a + key_block, n)
        rows = latent[a:b]
        if latent_scale is not None:
            rows = rows.float() * latent_scale[a:b, None]
        rows = rows.to(torch.bfloat16)  # no copy for a bf16 cache
        kv = torch.matmul(rows[:, :R], w).view(b - a, H, Dn + Dv)  # [S, H, Dn + Dv]
        k_nope = kv[..., :Dn].transpose(0, 1)  # [H, S, Dn] view
        vv = kv[..., Dn:].transpose(0, 1)
        mla_attn_block(q_nope, q_pe, k_nope, rows[:, R:], vv, out, m, l, p0, a, scale,
                       first=i == 0, last=i == len(starts) - 1, config=config)
        del kv
    return out
