"""MLA prefill flash-attention kernel (kernels/mla_prefill.py) vs pure-torch fp32 references.

CPU: reduced head dims under TRITON_INTERPRET=1 (dot operands upcast to fp32 there), small key blocks so
that several blocks, the causal diagonal and partial tiles are all exercised. GPU (@cuda): real shapes
(32 heads, 128 nope + 64 rope, v 128, latent 512) against the engine's SDPA version, bf16 and fp8 caches.
"""
import math
import sys
from pathlib import Path

import pytest
import torch

try:
    from kimi_local.kernels import mla_prefill
except ImportError:  # not pip-installed (device machine): import the source dirs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import mla_prefill

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
# interpreter: fp32 dots, so only summation order differs; GPU: q, k, v and p are bf16 tensor-core operands
KERNEL_TOL = 1e-5 if DEV == "cpu" else 1e-2
# whole function: the reference decompresses exactly like the engine (bf16 GEMMs); both round k / v to bf16
FULL_TOL = 2e-3 if DEV == "cpu" else 1e-2


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def attend_ref(q, k_nope, k_pe, v, q_pos, k_pos, scale):
    """fp32 causal attention: q [T, H, Dn+Dr], k_nope [H, S, Dn], k_pe [S, Dr], v [H, S, Dv];
    query t sees key s iff k_pos[s] <= q_pos[t]. Returns (o [T, H, Dv], lse [T, H]) fp32."""
    Dn = k_nope.shape[-1]
    q = q.float()
    s = torch.einsum("thd,hsd->hts", q[..., :Dn], k_nope.float()) + torch.einsum("thd,sd->hts", q[..., Dn:], k_pe.float())
    s = (s * scale).masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    lse = torch.logsumexp(s, -1)  # [H, T]
    o = torch.einsum("hts,hsd->thd", torch.exp(s - lse[..., None]), v.float())
    return o, lse.t()


def engine_like_ref(q, latent, latent_scale, k_b, v_b, p0, scale):
    """The engine's decompression (fp8 rows scaled in fp32, rounded to bf16; bf16 GEMMs per head), then
    fp32 attention over all rows 0..p0+T-1 at once."""
    T, H, _ = q.shape
    R = k_b.shape[1]
    n = p0 + T
    rows = latent[:n].float() if latent_scale is None else latent[:n].float() * latent_scale[:n, None]
    c = rows[:, :R].to(torch.bfloat16)
    k_nope = torch.matmul(c[None], k_b.to(torch.bfloat16))  # [H, n, Dn]
    v = torch.matmul(c[None], v_b.to(torch.bfloat16).transpose(1, 2))  # [H, n, Dv]
    k_pe = rows[:, R:].to(torch.bfloat16)
    pos = torch.arange(n, device=q.device)
    return attend_ref(q, k_nope, k_pe, v, pos[p0:], pos, scale)[0]  # q as given (the interpreter keeps fp32 q)


def make_inputs(T, p0, H, Dn=32, Dr=16, Dv=16, R=40, fp8=False, seed=0, pad=7, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    cap = p0 + T + pad
    q = torch.randn(T, H, Dn + Dr, generator=gen)
    lat = torch.randn(cap, R + Dr, generator=gen)
    k_b = torch.randn(H, R, Dn, generator=gen) / math.sqrt(R)
    v_b = torch.randn(H, Dv, R, generator=gen) / math.sqrt(R)
    sc = None
    if fp8:
        sc = torch.rand(cap, generator=gen) * 0.02 + 0.01
        lat = (lat / sc[:, None]).clamp(-448, 448).to(FP8)
        sc[p0 + T:] = float("nan")
    else:
        lat = lat.to(torch.bfloat16)
    lat[p0 + T:] = float("nan")  # rows past the chunk must never be read
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(q), mv(lat), mv(sc), mv(k_b.to(torch.bfloat16)), mv(v_b.to(torch.bfloat16))


# ---- the kernel alone: arbitrary fp32 keys/values, blocks merged through the running state -----------------
@pytest.mark.parametrize("T,q_start,blocks", [
    (1, 0, [(0, 1)]),
    (5, 3, [(0, 3), (3, 8)]),
    (37, 50, [(0, 16), (16, 45), (45, 87)]),  # a block straddling the diagonal
    (37, 50, [(0, 87)]),  # one block holding past and causal keys
    (20, 0, [(0, 7), (7, 20)]),  # causal only, split mid-diagonal
])
@pytest.mark.parametrize("H", [1, 3])
def test_kernel_blocks_match_reference(T, q_start, blocks, H):
    gen = torch.Generator().manual_seed(T * 7 + H)
    Dn, Dr, Dv = 32, 16, 16
    n = blocks[-1][1]
    q = torch.randn(T, H, Dn + Dr, generator=gen)
    k_nope, v = torch.randn(H, n, Dn, generator=gen), torch.randn(H, n, Dv, generator=gen)
    k_pe = torch.randn(n, Dr, generator=gen)
    scale = 0.3
    pos = torch.arange(n)
    ref, ref_lse = attend_ref(q, k_nope, k_pe, v, q_start + torch.arange(T), pos, scale)

    q = q.to(DEV)
    acc = torch.full((T, H, Dv), float("nan"), device=DEV)
    m, l = torch.full((T, H), float("nan"), device=DEV), torch.full((T, H), float("nan"), device=DEV)
    for i, (a, b) in enumerate(blocks):
        S = b - a
        # each block's tensors are slices of NaN-padded buffers: rows past the block must never be read
        kn = torch.full((H, S + 16, Dn), float("nan"))
        kn[:, :S] = k_nope[:, a:b]
        kp = torch.full((S + 16, Dr), float("nan"))
        kp[:S] = k_pe[a:b]
        vv = torch.full((H, S + 16, Dv), float("nan"))
        vv[:, :S] = v[:, a:b]
        mla_prefill.mla_attn_block(q[..., :Dn], q[..., Dn:], kn[:, :S].to(DEV), kp[:S].to(DEV), vv[:, :S].to(DEV),
                                   acc, m, l, q_start, a, scale, first=i == 0, last=i == len(blocks) - 1)
    assert not acc.isnan().any() and not m.isnan().any()
    assert rel(acc.cpu(), ref) < KERNEL_TOL
    assert (m.cpu() - ref_lse).abs().max().item() < (1e-4 if DEV == "cpu" else 2e-2)


def test_kernel_shared_key_heads_and_strided_k_pe():
    """k_nope with head stride 0 (one key set for every head) and k_pe read out of wider rows."""
    gen = torch.Generator().manual_seed(11)
    T, H, Dn, Dr, Dv, S = 19, 3, 16, 16, 32, 40
    q = torch.randn(T, H, Dn + Dr, generator=gen)
    k1 = torch.randn(1, S, Dn, generator=gen)
    rows = torch.randn(S, 48 + Dr, generator=gen)
    v = torch.randn(H, S, Dv, generator=gen)
    ref, _ = attend_ref(q, k1.expand(H, -1, -1), rows[:, 48:], v, torch.arange(T) + S - T, torch.arange(S), 0.25)
    acc = torch.full((T, H, Dv), float("nan"), device=DEV)
    m, l = torch.empty(T, H, device=DEV), torch.empty(T, H, device=DEV)
    q, k1, rows, v = q.to(DEV), k1.to(DEV), rows.to(DEV), v.to(DEV)
    mla_prefill.mla_attn_block(q[..., :Dn], q[..., Dn:], k1.expand(H, -1, -1), rows[:, 48:], v, acc, m, l,
                               S - T, 0, 0.25, first=True, last=True)
    assert rel(acc.cpu(), ref) < KERNEL_TOL


# ---- the drop-in function: latent cache in, [T, H, Dv] fp32 out ---------------------------------------------
@pytest.mark.parametrize("T", [1, 5, 37])
@pytest.mark.parametrize("p0", [0, 3, 50])
@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("key_block", [16, 32])
def test_prefill_attention_matches_reference(T, p0, H, key_block):
    q, lat, sc, k_b, v_b = make_inputs(T, p0, H, seed=T * 100 + p0 + H)
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.full((T, H, v_b.shape[1]), float("nan"), device=DEV)
    got = mla_prefill.mla_prefill_attention(q, lat, sc, k_b, v_b, p0, scale, key_block=key_block, out=out)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float32 and got.shape == (T, H, v_b.shape[1])
    assert not got.isnan().any()
    assert rel(got.cpu(), engine_like_ref(q, lat, sc, k_b, v_b, p0, scale).cpu()) < FULL_TOL


@pytest.mark.parametrize("T,p0,key_block", [(5, 3, 16), (37, 50, 32), (24, 0, 1000)])
def test_prefill_attention_fp8_latent(T, p0, key_block):
    q, lat, sc, k_b, v_b = make_inputs(T, p0, 3, fp8=True, seed=5 + T)
    scale = 1 / math.sqrt(q.shape[-1])
    got = mla_prefill.mla_prefill_attention(q.to(torch.bfloat16), lat, sc, k_b, v_b, p0, scale, key_block=key_block)
    assert not got.isnan().any()
    assert rel(got.cpu(), engine_like_ref(q, lat, sc, k_b, v_b, p0, scale).cpu()) < FULL_TOL


def test_prefill_attention_strided_q():
    """q as a non-contiguous view (e.g. a slice of a wider projection) gives the same result."""
    T, p0, H = 9, 20, 3
    q, lat, sc, k_b, v_b = make_inputs(T, p0, H, seed=3)
    wide = torch.randn(T, H, q.shape[-1] + 8, device=DEV)
    wide[..., 4:4 + q.shape[-1]] = q
    a = mla_prefill.mla_prefill_attention(wide[..., 4:4 + q.shape[-1]], lat, sc, k_b, v_b, p0, 0.2, key_block=16)
    b = mla_prefill.mla_prefill_attention(q, lat, sc, k_b, v_b, p0, 0.2, key_block=16)
    assert torch.equal(a, b)


# ---- GPU: real shapes against the engine's SDPA path -------------------------------------------------------
def _real_inputs(T, p0, fp8, seed=0):
    H, Dn, Dr, Dv, R = 32, 128, 64, 128, 512
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = p0 + T
    q = (torch.randn(T, H, Dn + Dr, device="cuda", generator=g)).to(torch.bfloat16)
    lat = torch.randn(n + 64, R + Dr, device="cuda", generator=g)
    sc = None
    if fp8:
        sc = torch.rand(n + 64, device="cuda", generator=g) * 0.02 + 0.01
        lat = (lat / sc[:, None]).clamp(-448, 448).to(FP8)
    else:
        lat = lat.to(torch.bfloat16)
    k_b = (torch.randn(H, R, Dn, device="cuda", generator=g) / math.sqrt(R) * 2).to(torch.bfloat16)
    v_b = (torch.randn(H, Dv, R, device="cuda", generator=g) / math.sqrt(R)).to(torch.bfloat16)
    return q, lat, sc, k_b, v_b


@pytest.mark.cuda
@pytest.mark.parametrize("fp8", [False, True])
def test_prefill_attention_matches_engine_real_shapes(fp8):
    from kimi_local.engine import mla_prefill_attention as engine_attn

    T, p0 = 512, 3000
    q, lat, sc, k_b, v_b = _real_inputs(T, p0, fp8)
    scale = 1 / math.sqrt(192)
    ref = engine_attn(q, lat, sc, k_b, v_b, p0, scale, 1024)
    out = torch.full((T, 32, 128), float("nan"), device="cuda")
    got = mla_prefill.mla_prefill_attention(q, lat, sc, k_b, v_b, p0, scale, key_block=1024, out=out)
    torch.cuda.synchronize()
    assert not got.isnan().any()
    assert rel(got, ref) < 1e-2


_ALL_CFGS = [dict(c) for c in {tuple(c.items()): 0 for c in
                                 mla_prefill.SWEEP + mla_prefill.CONFIGS["sm90"] + mla_prefill.CONFIGS["sm80"]}]


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", _ALL_CFGS,
                         ids=lambda c: "BM{BM}_BN{BN}_w{num_warps}_s{num_stages}".format(**c))
def test_prefill_attention_configs_real_shapes(cfg):
    """Every listed launch configuration gives the same result at the real head dims (or cannot launch
    on this device for lack of shared memory / registers, which the default path skips)."""
    import triton

    T, p0 = 300, 700  # partial query tile, block boundary inside the past, diagonal inside a block
    q, lat, sc, k_b, v_b = _real_inputs(T, p0, False, seed=1)
    scale = 1 / math.sqrt(192)
    ref = engine_like_ref(q, lat, sc, k_b, v_b, p0, scale)
    try:
        got = mla_prefill.mla_prefill_attention(q, lat, sc, k_b, v_b, p0, scale, key_block=512, config=cfg)
    except triton.runtime.errors.OutOfResources:
        pytest.skip("does not fit this device")
    assert rel(got, ref) < 1e-2
