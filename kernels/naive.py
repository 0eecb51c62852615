"""Pure-torch reference for every op of the model (spec section 3). Runs on CPU and CUDA.

These are the oracles the Triton kernels are tested against, and the CPU path of the model.
Shapes are for one sequence (no batch axis): T tokens, H heads, K key dim, V value dim.
Recurrent math is fp32 whatever the input dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ---- norms ---------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """KimiRMSNorm: normalise in fp32, cast back to x's dtype, then scale by w."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return w.to(x.dtype) * y


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last axis, in fp32 (fla's convention)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)


def gated_rms_norm(o: torch.Tensor, z: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """KDA output norm: per-head RMSNorm of o [..., V] times w [V] times sigmoid(z); fp32 math."""
    of = o.float()
    y = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + eps) * w.float()
    return y * torch.sigmoid(z.float())


# ---- KDA pieces ----------------------------------------------------------------------------
def short_conv(x: torch.Tensor, w: torch.Tensor, tail: torch.Tensor | None):
    """Depthwise causal conv + SiLU. x [T, C] raw projections, w [C, W] (tap W-1 = current token),
    tail [C, W-1] the previous W-1 raw inputs, oldest first (None = zeros).
    Returns (y [T, C] fp32, new_tail [C, W-1] in x's dtype)."""
    T, C = x.shape
    W = w.shape[1]
    if tail is None:
        tail = x.new_zeros(C, W - 1)
    full = torch.cat([tail.to(x.dtype).t(), x], 0).float()  # [W-1+T, C]
    wf = w.float()
    y = sum(full[j : j + T] * wf[:, j] for j in range(W))
    new_tail = full[T:].t().to(x.dtype).contiguous()  # last W-1 raw inputs
    return F.silu(y), new_tail


def kda_gate(f: torch.Tensor, a: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Log-space decay g = a[h] * softplus(f + dt_bias), a = -exp(A_log) (<= 0).
    f [T, H, K], a [H], dt_bias [H, K] -> g [T, H, K] fp32 (<= 0)."""
    return a.float()[:, None] * F.softplus(f.float() + dt_bias.float())


def kda_recurrent(q, k, v, g, beta, state=None, scale=None):
    """Token-by-token delta rule with per-key-channel decay (spec 3.3e; fla naive_recurrent_kda).
    q, k [T, H, K] (already L2-normalised), v [T, H, V], g [T, H, K] log decay, beta [T, H],
    state [H, K, V] fp32 or None. q is multiplied by scale (default K^-0.5) here.
    Returns (o [T, H, V] fp32, final state [H, K, V] fp32)."""
    T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    S = torch.zeros(H, K, V, dtype=torch.float32, device=q.device) if state is None else state.float().clone()
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    o = torch.empty(T, H, V, dtype=torch.float32, device=q.device)
    for t in range(T):
        S = S * g[t].exp()[:, :, None]  # decay the key axis
        u = v[t] - torch.einsum("hkv,hk->hv", S, k[t])  # error against the decayed state
        S = S + beta[t][:, None, None] * k[t][:, :, None] * u[:, None, :]
        o[t] = torch.einsum("hkv,hk->hv", S, q[t] * scale)
    return o, S


def kda_chunked(q, k, v, g, beta, state=None, scale=None, chunk: int = 64):
    """Chunked (WY) form of kda_recurrent, same contract, any T (spec 3.3g). Exponentials are
    only ever taken of non-positive differences of cumulative decays, so they never overflow."""
    T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    S = torch.zeros(H, K, V, dtype=torch.float32, device=q.device) if state is None else state.float().clone()
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    q = q * scale
    o = torch.empty(T, H, V, dtype=torch.float32, device=q.device)
    eye = torch.eye(chunk, device=q.device)
    for c0 in range(0, T, chunk):
        c1 = min(c0 + chunk, T)
        C = c1 - c0
        qc, kc, vc, bc = (x[c0:c1].transpose(0, 1) for x in (q, k, v, beta))  # [H, C, .]
        G = g[c0:c1].transpose(0, 1).cumsum(1)  # [H, C, K] cumulative log decay, non-increasing
        D = (G[:, :, None, :] - G[:, None, :, :]).clamp(max=0).exp()  # [H, r, s, K], exp(G_r - G_s) for r >= s
        kk = torch.einsum("hrd,hsd,hrsd->hrs", kc, kc, D)
        qk = torch.einsum("hrd,hsd,hrsd->hrs", qc, kc, D)
        strict = torch.tril(torch.ones(C, C, dtype=torch.bool, device=q.device), -1)
        L = torch.where(strict, kk * bc[:, :, None], 0.0)
        P = torch.where(strict | torch.eye(C, dtype=torch.bool, device=q.device), qk, 0.0)
        Tm = torch.linalg.solve_triangular(eye[:C, :C] + L, torch.diag_embed(bc), upper=False)  # (I+L)^-1 diag(b)
        W = Tm @ (G.exp() * kc)  # [H, C, K]
        U = Tm @ vc  # [H, C, V]
        Vn = U - W @ S  # new values
        o[c0:c1] = ((qc * G.exp()) @ S + P @ Vn).transpose(0, 1)
        Gl = G[:, -1:, :]  # [H, 1, K]
        S = Gl.transpose(1, 2).exp() * S + ((Gl - G).exp() * kc).transpose(1, 2) @ Vn
    return o, S


# ---- MLA (no RoPE) -------------------------------------------------------------------------
def mla_expanded(q, c, kpe, k_b, v_b, q_pos, scale):
    """Decompressed multi-head form (spec 3.5a). q [T, H, Dn+Dr], c [S, R] normalised latents,
    kpe [S, Dr] shared key part, k_b [H, R, Dn] (GGUF attn_k_b), v_b [H, Dv, R] (attn_v_b),
    q_pos [T] absolute position of each query (query t sees keys 0..q_pos[t]).
    Returns o [T, H, Dv] fp32."""
    Dn = k_b.shape[-1]
    qf, cf = q.float(), c.float()
    k_nope = torch.einsum("sr,hrd->hsd", cf, k_b.float())  # [H, S, Dn]
    vv = torch.einsum("sr,hdr->hsd", cf, v_b.float())  # [H, S, Dv]
    s = torch.einsum("thd,hsd->hts", qf[..., :Dn], k_nope) + torch.einsum("thd,sd->hts", qf[..., Dn:], kpe.float())
    mask = torch.arange(c.shape[0], device=q.device)[None, :] > q_pos[:, None]  # [T, S]
    p = torch.softmax((s * scale).masked_fill(mask, float("-inf")), -1)
    return torch.einsum("hts,hsd->thd", p, vv)


def mla_absorbed(q, c, kpe, k_b, v_b, q_pos, scale):
    """Absorbed/latent form over the 576-value cache (spec 3.5b); same contract as mla_expanded."""
    Dn = k_b.shape[-1]
    qf = q.float()
    q_abs = torch.einsum("hrd,thd->thr", k_b.float(), qf[..., :Dn])  # [T, H, R]
    s = torch.einsum("thr,sr->hts", q_abs, c.float()) + torch.einsum("thd,sd->hts", qf[..., Dn:], kpe.float())
    mask = torch.arange(c.shape[0], device=q.device)[None, :] > q_pos[:, None]
    p = torch.softmax((s * scale).masked_fill(mask, float("-inf")), -1)
    ctx = torch.einsum("hts,sr->thr", p, c.float())  # [T, H, R]
    return torch.einsum("hdr,thr->thd", v_b.float(), ctx)


def mla_scale(qk_head_dim: int) -> float:
    return 1.0 / math.sqrt(qk_head_dim)


# ---- MoE -----------------------------------------------------------------------------------
def route(x, w, bias, k: int, scale: float, biased_weights: bool = False, renormalize: bool = True):
    """Sigmoid router (spec 3.4). x [T, D], w [E, D], bias [E] (selection only).
    Returns (ids [T, k] int64, weights [T, k] fp32, already times the routed scaling factor).
    biased_weights=True reproduces the HF remote code, whose weights include the bias."""
    s = torch.sigmoid(x.float() @ w.float().t())  # [T, E]
    biased = s + bias.float()
    ids = torch.topk(biased, k, dim=-1).indices
    wts = torch.gather(biased if biased_weights else s, 1, ids)
    if renormalize:
        wts = wts / (wts.sum(-1, keepdim=True) + 1e-20)
    return ids, wts * scale


def swiglu(x, w_gate, w_up, w_down):
    """Dense SwiGLU MLP on dense weights ([F, D], [F, D], [D, F])."""
    return (F.silu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()


# ---- adapters with the Triton kernels' contracts (kernels/kda.py, kernels/mla.py) ----------
def kda_decode_ref(q_raw, k_raw, v_raw, f, beta_logit, z, conv_w, conv_tail, a, dt_bias, norm_w, state,
                   eps: float, scale=None):
    """One KDA decode token, kernels.kda.kda_decode_step's contract, composed from the ops above.
    Updates conv_tail (three [P_i, W-1]) and state [H, K, V] in place; returns out [H*V] fp32."""
    H, K, V = state.shape
    ys = []
    for x, w, t in zip((q_raw, k_raw, v_raw), conv_w, conv_tail):
        y, new_tail = short_conv(x[None], w, t)
        t.copy_(new_tail)
        ys.append(y[0])
    q, k, v = l2norm(ys[0].view(1, H, K)), l2norm(ys[1].view(1, H, K)), ys[2].view(1, H, V)
    g = kda_gate(f.view(1, H, K), a, dt_bias.view(H, K))
    beta = torch.sigmoid(beta_logit.float()).view(1, H)
    o, s = kda_recurrent(q, k, v, g, beta, state, scale)
    state.copy_(s)
    return gated_rms_norm(o[0], z.view(H, V), norm_w, eps).reshape(H * V)


def mla_latent_attend(q_abs, q_pe, c, kpe, scale):
    """Absorbed MLA for one query over S cached rows: q_abs [H, R], q_pe [H, Dr], c [S, R], kpe [S, Dr].
    Returns ctx [H, R] fp32 = softmax((q_abs c^T + q_pe kpe^T) * scale) c (spec 3.5b)."""
    s = (q_abs.float() @ c.float().t() + q_pe.float() @ kpe.float().t()) * scale
    return torch.softmax(s, -1) @ c.float()


# ---- quantized matmul / MoE references (for kernels/quant_matmul.py, kernels/moe.py) ----------
def quantize_x8_ref(x: torch.Tensor):
    """Int8 activations of the x8 GEMV path (kernels/quant_matmul.py): x [K] -> (q [K/16, 16] fp32 holding
    integers in [-127, 127], dx [K/16]) with x ~ q * dx per group of 16; q = floor(x * 127 / amax + 0.5)."""
    g = x.float().reshape(-1, 16)
    amax = g.abs().amax(1)
    inv = torch.where(amax > 0, 127.0 / amax.clamp_min(1e-30), torch.zeros_like(amax))
    return torch.floor(g * inv[:, None] + 0.5), amax / 127.0


def dequantize_x8_ref(x: torch.Tensor) -> torch.Tensor:
    """The values the x8 path multiplies by: q * dx (fp32 [K])."""
    q, dx = quantize_x8_ref(x)
    return (q * dx[:, None]).reshape(-1)


def qlinear_ref(x, w_dense):
    """x [..., K] @ w_dense [N, K]^T in fp32 (w_dense: the dequantized weight)."""
    return x.float() @ w_dense.float().t()


def moe_ref(x, topk_ids, topk_w, gate_w, up_w, down_w, shared=None):
    """Routed SwiGLU experts on dense weights, fp32. x [T, D] (or [D]); topk_ids / topk_w [T, k];
    gate_w, up_w [E, F, D], down_w [E, D, F]; shared: (gate [Fs, D], up [Fs, D], down [D, Fs]) or None,
    added unweighted. Returns [T, D] (or [D]) fp32 = sum_j w_j * expert_{id_j}(x) (+ shared(x))."""
    squeeze = x.dim() == 1
    x = (x[None] if squeeze else x).float()
    ids = topk_ids.reshape(x.shape[0], -1).long()
    wts = topk_w.reshape(x.shape[0], -1).float()
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        h = F.silu(x[t] @ gate_w[e].float().t()) * (x[t] @ up_w[e].float().t())
        out.index_add_(0, t, (h @ down_w[e].float().t()) * wts[t, j, None])
    if shared is not None:
        sg, su, sd = (w.float() for w in shared)
        out += (F.silu(x @ sg.t()) * (x @ su.t())) @ sd.t()
    return out[0] if squeeze else out


def resolve_experts(t, ids: torch.Tensor, prefetch: bool = False) -> torch.Tensor:
    """Reference of kernels/expert_cache.resolve on a LayerTables `t` (updated in place, same fields):
    hits keep their slot; each miss, in id order, takes the slot with the lowest victim key (empty
    slot = -inf, a slot holding an id of this call = +inf, else its expert's score; ties: lowest slot).
    Demand: scores decay and add uses (LFU) or take the clock (LRU), counts and stats update."""
    ids = [int(e) for e in ids.tolist()]
    n = len(ids)
    res = [int(t.expert_slot[e]) for e in ids]
    key = torch.where(t.slot_expert < 0, torch.tensor(-math.inf),
                      t.score[t.slot_expert.clamp(min=0).long()]).float()
    for s in res:
        if s >= 0:
            key[s] = math.inf
    slots, miss = (t.pf_slots, t.pf_miss) if prefetch else (t.slots, t.miss)
    miss.fill_(-1)
    pf_hits = sum(int(t.flag[s]) for s in res if s >= 0)
    for j, (e, s) in enumerate(zip(ids, res)):
        if s >= 0:
            slots[j] = s
            continue
        v = int(torch.argmin(key))
        if key[v] == math.inf:
            slots[j] = -1
            continue
        old = int(t.slot_expert[v])
        if old >= 0:
            t.expert_slot[old] = -1
        t.expert_slot[e], t.slot_expert[v] = v, e
        key[v] = math.inf
        miss[0, j], miss[1, j], slots[j] = e, v, v
    n_miss = int((miss[1] >= 0).sum())
    st = t.stats
    if prefetch:
        t.guess.fill_(-1)
        t.guess[:n] = torch.tensor(ids, dtype=t.guess.dtype)
        t.flag[miss[1][miss[1] >= 0].long()] = 1
        st[4] += n_miss
        st[6] += n
        return slots[:n]
    guess = {int(g) for g in t.guess.tolist() if g >= 0}
    t.guess.fill_(-1)
    t.flag.zero_()
    used = torch.zeros_like(t.score)
    used[torch.tensor(ids, dtype=torch.long)] = 1.0
    if t.lru:
        t.score.copy_(torch.where(used > 0, t.clock.expand_as(t.score), t.score))
    else:
        t.score.copy_(t.score * t.decay + used)
    t.clock += 1
    t.counts += used
    st[0] += 1
    st[1] += n
    st[2] += sum(s >= 0 for s in res)
    st[3] += n_miss
    st[5] += pf_hits
    if guess:
        st[7] += len(guess & set(ids))
        st[8] += n
    return slots[:n]


# ---- sampling noise (kernels/sample.py) -----------------------------------------------------------------
M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B1  # 2^32 / golden ratio: spreads consecutive vocabulary ids over the hash's input


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of x in [0, 2^32) (int64 tensor; xor-shift-multiply rounds, products < 2^59)."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & M32
    return x ^ (x >> 16)


def gumbel_ref(seed: int, step: torch.Tensor, n: int) -> torch.Tensor:
    """[n] fp32 Gumbel(0, 1) noise of sampling step `step` (int64 tensor [1]) under `seed`: u_i = hash(seed,
    step, i) with 24 random bits, centred in its bin (0 < u < 1), g = -log(-log(u)). Integer math only up to
    u, so every device draws the same u."""
    i = torch.arange(n, dtype=torch.int64, device=step.device)
    base = mix32(mix32(torch.full_like(step, seed & M32)) ^ (step & M32))  # [1]
    x = mix32(mix32((i * GOLDEN + base) & M32) ^ base)
    u = ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))
