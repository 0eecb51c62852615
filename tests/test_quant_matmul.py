"""Quantized matmul kernels (kernels/quant_matmul.py) vs dense fp32 references.

CPU: Triton interpreter at tiny shapes, every type. CUDA (-m cuda): real shapes (lm_head [163840, 2304],
KDA projections [4096, 2304], prefill GEMM), graph capture. The byte-layout oracle is gguf-py's
dequantize when installed (CPU), else the project's pure-torch `quant.formats.dequantize`.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

try:
    from kimi_local.kernels import quant_matmul as qm
    from kimi_local.kernels.naive import qlinear_ref
except ImportError:  # not pip-installed (device machine): import the source dirs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import quant_matmul as qm
    from kernels.naive import qlinear_ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
QUANT = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
# byte offsets of the fp16 scale fields in each ggml block
FP16_FIELDS = {"Q8_0": [0], "Q6_K": [208], "Q5_K": [0, 2], "Q4_K": [0, 2], "Q3_K": [108], "Q2_K": [80, 82]}


@pytest.fixture(autouse=True)
def _fp_activations(monkeypatch):
    """The word path's default is int8 activations (x8); these tests check the fp path unless they pass x8."""
    monkeypatch.setenv("KIMI_LOCAL_X8", "0")


def random_blocks(qtype, N, K, device="cpu", gen=None, scale=0.01):
    """Random valid ggml rows uint8 [N, row_bytes]: random bytes, fp16 scale fields set to sane values."""
    nb, ts = K // qm.QK[qtype], qm.TYPE_SIZE[qtype]
    b = torch.randint(0, 256, (N, nb, ts), dtype=torch.uint8, generator=gen).to(device)
    for o in FP16_FIELDS[qtype]:
        v = (torch.rand(N, nb, 1, generator=gen) * scale + scale / 10).half().to(device)
        b[..., o:o + 2] = v.view(torch.uint8)
    return b.reshape(N, nb * ts)


def oracle_dequant(raw, qtype):
    """ggml rows -> fp32 [N, K] through an independent implementation."""
    if raw.device.type == "cpu":
        try:
            import gguf

            t = gguf.GGMLQuantizationType[qtype]
            return torch.from_numpy(gguf.quants.dequantize(raw.numpy(), t).copy()).float()
        except ImportError:
            pass
    try:
        from kimi_local.quant.formats import dequantize
    except ImportError:
        from quant.formats import dequantize
    return dequantize(raw, qtype).float()


def make_weight(qtype, N, K, device="cpu", gen=None):
    """(packed, dense fp32 reference) for a random [N, K] weight."""
    if qtype == "BF16":
        w = torch.randn(N, K, generator=gen).bfloat16().to(device)
        return qm.repack(w, "BF16"), w.float()
    raw = random_blocks(qtype, N, K, device, gen)
    return qm.repack(raw, qtype), oracle_dequant(raw, qtype).to(device)


def rel_rmse(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def check(y, ref, tol):
    assert not torch.isnan(y).any(), "unwritten (NaN-poisoned) outputs"
    e = rel_rmse(y, ref)
    assert e < tol, f"relative RMSE {e:.3e} >= {tol}"
    m = (y.double() - ref.double()).abs().max().item()
    assert m <= 20 * tol * ref.abs().max().item() + 1e-6, f"max abs err {m:.3e}"


# fp32 paths: fp32 FMA (and fp32 tl.dot in the interpreter); bf16 tensor-core dot on the GPU
TOL_F32 = 1e-5
TOL_DOT = 1e-5 if INTERPRET else 1e-2


@pytest.mark.parametrize("qtype", QUANT)
def test_repack_size(qtype):
    K = 512
    raw = random_blocks(qtype, 3, K)
    p = qm.repack(raw, qtype)
    assert p.dtype == torch.uint8 and p.shape == (3, qm.packed_row_bytes(qtype, K))
    assert p.numel() <= 1.05 * raw.numel()
    # leading (slot) dims are independent matrices
    raw3 = torch.stack([raw, random_blocks(qtype, 3, K)])
    assert torch.equal(qm.repack(raw3, qtype)[0], p)


@pytest.mark.parametrize("qtype", QUANT + ["BF16"])
def test_dequantize_gpu(qtype):
    g = torch.Generator().manual_seed(1)
    N, K = 7, 768 if qtype != "Q8_0" else 96
    p, ref = make_weight(qtype, N, K, gen=g)
    out = torch.full((N, K), float("nan"))
    qm.dequantize_gpu(p, qtype, (N, K), out=out)
    assert torch.equal(out, ref), "fp32 dequant must be exact"
    ob = qm.dequantize_gpu(p, qtype, (N, K))
    assert ob.dtype == torch.bfloat16
    # the interpreter truncates fp32 -> bf16: allow one bf16 ulp
    assert ((ob.float() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-30).all()


@pytest.mark.parametrize("qtype", QUANT)
def test_embed_gpu(qtype):
    # gathered rows (repeats, first and last row) equal the exact fp32 dequantization of those rows
    g = torch.Generator().manual_seed(2)
    N, K = 9, 768 if qtype != "Q8_0" else 96
    p, ref = make_weight(qtype, N, K, gen=g)
    ids = torch.tensor([4, 0, 8, 4], dtype=torch.int64)
    out = torch.full((4, K), float("nan"))
    qm.embed_gpu(ids, p, qtype, (N, K), out=out)
    assert torch.equal(out, ref[ids])
    ob = qm.embed_gpu(ids.to(torch.int32)[:1], p, qtype, (N, K))
    assert ob.shape == (1, K) and ob.dtype == torch.bfloat16
    assert torch.equal(ob, ref[4:5].to(torch.bfloat16))  # rounded to nearest (the interpreter: in torch)


@pytest.mark.cuda
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0"])
def test_embed_gpu_cuda(qtype):
    # real width (hidden 2304), int64 ids on the device; bf16 rows = the exact fp32 dequantization rounded
    g = torch.Generator().manual_seed(3)
    N, K = 1000, 2304
    p, ref = make_weight(qtype, N, K, gen=g)
    ids = torch.tensor([999, 0, 517], dtype=torch.int64)
    out = torch.full((3, K), float("nan"), device="cuda")
    qm.embed_gpu(ids.cuda(), p.cuda(), qtype, (N, K), out=out)
    assert torch.equal(out.cpu(), ref[ids])
    ob = qm.embed_gpu(ids.cuda(), p.cuda(), qtype, (N, K))
    assert torch.equal(ob.cpu(), ref[ids].to(torch.bfloat16))


@pytest.mark.parametrize("qtype", QUANT + ["BF16"])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_qgemv(qtype, M):
    g = torch.Generator().manual_seed(2 + M)
    N, K = 13, 512
    p, wd = make_weight(qtype, N, K, gen=g)
    x = torch.randn(K, M, generator=g).t()  # non-contiguous [M, K]
    out = torch.full((M, N), float("nan"))
    qm.qgemv(x, p, qtype, N, out=out)
    check(out, qlinear_ref(x, wd), TOL_F32)


def test_qgemv_1d_bf16():
    g = torch.Generator().manual_seed(3)
    N, K = 21, 256
    p, wd = make_weight("Q4_K", N, K, gen=g)
    x = torch.randn(K, generator=g).bfloat16()
    y = qm.qgemv(x, p, "Q4_K", N)
    assert y.shape == (N,) and y.dtype == torch.bfloat16
    check(y.float(), qlinear_ref(x, wd), 1e-2)



@pytest.mark.parametrize("qtype,N,K,kw", [
    ("Q4_K", 37, 768, dict(BN=16, C=8, SPLIT=1)),
    ("Q4_K", 20, 768, dict(BN=16, C=16, SPLIT=2)),  # split + clamped chunks (24 per split, C=16)
    ("Q6_K", 19, 768, dict(BN=8, C=4, SPLIT=3)),
    ("Q6_K", 9, 512, dict(BN=16, C=8, SPLIT=1)),
    ("Q8_0", 17, 160, dict(BN=8, C=4, SPLIT=2)),  # 5 blocks: uneven split, clamped chunks
    ("Q8_0", 33, 512, dict(BN=32, C=8, SPLIT=4)),
    ("Q3_K", 11, 768, dict(BN=16, C=4, SPLIT=2)),
    ("Q3_K", 16, 256, dict(BN=16, C=2, SPLIT=1)),
    ("Q5_K", 37, 768, dict(BN=16, C=8, SPLIT=1)),
    ("Q5_K", 20, 768, dict(BN=16, C=16, SPLIT=2)),  # uneven split (2 + 1 blocks) + clamped chunks (8 of C=16)
    ("Q5_K", 9, 512, dict(BN=8, C=2, SPLIT=1)),
    ("Q2_K", 11, 768, dict(BN=16, C=4, SPLIT=2)),  # uneven split
    ("Q2_K", 25, 768, dict(BN=8, C=8, SPLIT=2)),  # uneven split + clamped chunks (4 of C=8)
    ("Q2_K", 16, 256, dict(BN=16, C=2, SPLIT=1)),
    ("Q4_K", 20, 768, dict(BN=16, C=32, SPLIT=1)),  # C above the slice (24 chunks): one clamped step of 32
    ("Q8_0", 17, 288, dict(BN=8, C=32, SPLIT=1)),  # 18 chunks in one step of 32
    ("BF16", 7, 256, dict()),  # not a word type: method "auto" takes the tile path
])
def test_qgemv_word(qtype, N, K, kw):
    g = torch.Generator().manual_seed(20 + N)
    p, wd = make_weight(qtype, N, K, gen=g)
    for _ in range(2):  # second call: counters re-armed by the kernel
        x = torch.randn(K, 2, generator=g)[:, 1]  # strided [K]
        out = torch.full((N,), float("nan"))
        qm.qgemv(x, p, qtype, N, out=out, method="word" if qtype in qm.WORD_QTYPES else "auto", **kw)
        check(out, qlinear_ref(x, wd), TOL_F32)
    if kw.get("SPLIT", 1) > 1:
        _, cnt = qm.split_workspace(out.device, kw["SPLIT"] * N, -(-N // kw["BN"]))
        assert int(cnt.abs().sum()) == 0


def test_word_qtypes():
    """Every ggml type has the word path (the fused MoE decode needs all six of its types there)."""
    assert set(qm.WORD_QTYPES) == set(QUANT)
    assert set(qm.CHUNKS_PER_BLOCK) == set(qm._WORD_C) == set(QUANT)
    for q in QUANT:  # 16-byte chunks of the main quant plane per block
        assert qm.CHUNKS_PER_BLOCK[q] == {"Q8_0": 32, "Q6_K": 64, "Q5_K": 128, "Q4_K": 128, "Q3_K": 64,
                                          "Q2_K": 64}[q] // 16
    assert qm.word_c("Q5_K", 768, 16) == (8, True) and qm.word_c("Q2_K", 768, 8) == (4, True)
    assert qm.word_c("BF16", 256) == (1, True)
    # an explicit C at least the slice's chunk count: one step (a power of two, clamped when above the count)
    assert qm.word_c("Q4_K", 768, 32) == (32, False) and qm.word_c("Q5_K", 512, 16) == (16, True)
    assert qm.word_c("Q8_0", 288, 64) == (32, False)


def test_qgemv_word_extreme_x():
    """Activations from 2^-40 to 2^30 (the word path scales x by up to 2^93 and back)."""
    g = torch.Generator().manual_seed(30)
    N, K = 16, 256
    for qtype in ["Q4_K", "Q8_0", "Q6_K", "Q3_K", "Q5_K", "Q2_K"]:
        p, wd = make_weight(qtype, N, K, gen=g)
        x = torch.randn(K, generator=g) * torch.exp2(torch.randint(-40, 30, (K,), generator=g).float())
        out = torch.full((N,), float("nan"))
        qm.qgemv(x, p, qtype, N, out=out, method="word")
        check(out, qlinear_ref(x, wd), TOL_F32)


@pytest.mark.parametrize("qtype", QUANT + ["BF16"])
def test_qgemm_fused(qtype):
    g = torch.Generator().manual_seed(4)
    M, N, K = 19, 21, 512
    p, wd = make_weight(qtype, N, K, gen=g)
    x = torch.randn(K, M, generator=g).t()  # non-contiguous
    out = torch.full((M, N), float("nan"))
    qm.qgemm(x, p, qtype, N, out=out)
    check(out, qlinear_ref(x, wd), TOL_DOT)


@pytest.mark.parametrize("qtype", ["Q6_K", "Q3_K"])
def test_qgemm_cublas_and_qlinear(qtype):
    g = torch.Generator().manual_seed(5)
    M, N, K = 17, 12, 256
    p, wd = make_weight(qtype, N, K, gen=g)
    x = torch.randn(M, K, generator=g).bfloat16()
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
    qm.qgemm(x, p, qtype, N, out=out, method="cublas")
    check(out.float(), qlinear_ref(x, wd), 1e-2)
    x3 = torch.randn(2, 5, K, generator=g)  # [..., K]; 10 rows -> GEMM path
    y = qm.qlinear(x3, p, qtype, N)
    assert y.shape == (2, 5, N)
    check(y, qlinear_ref(x3, wd), TOL_DOT)
    y1 = qm.qlinear(x3[:, :1], p, qtype, N)  # 2 rows -> GEMV path
    check(y1, qlinear_ref(x3[:, :1], wd), TOL_F32)
    xl = torch.randn(qm.GEMM_CUBLAS_MIN_M + 3, K, generator=g).bfloat16()  # dequant + matmul path, into `out`
    yl = torch.full((xl.shape[0], N), float("nan"), dtype=torch.bfloat16)
    assert qm.qlinear(xl, p, qtype, N, out=yl) is yl
    check(yl.float(), qlinear_ref(xl, wd), 1e-2)


def test_q8_0_k_not_multiple_of_256():
    g = torch.Generator().manual_seed(6)
    N, K = 9, 128 + 32  # f_b_proj has K = 128
    p, wd = make_weight("Q8_0", N, K, gen=g)
    x = torch.randn(2, K, generator=g)
    check(qm.qgemv(x, p, "Q8_0", N), qlinear_ref(x, wd), TOL_F32)
    xm = torch.randn(18, K, generator=g)
    check(qm.qgemm(xm, p, "Q8_0", N), qlinear_ref(xm, wd), TOL_DOT)


# ------------------------------------------------------------------------------------------------
# GPU, real shapes


def _gpu_weight(qtype, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    raw = random_blocks(qtype, N, K, "cuda", g, scale=0.001)
    return qm.repack(raw, qtype), raw


def _gpu_dense(raw, qtype):
    try:
        from kimi_local.quant.formats import dequantize
    except ImportError:
        from quant.formats import dequantize
    return dequantize(raw, qtype).float()


@pytest.mark.cuda
@pytest.mark.parametrize("qtype,N,K", [("Q6_K", 163840, 2304), ("Q4_K", 163840, 2304), ("Q8_0", 4096, 2304),
                                       ("Q5_K", 4096, 2304), ("Q3_K", 2304, 4096), ("Q2_K", 1024, 2304),
                                       ("Q8_0", 4096, 128), ("Q6_K", 2304, 4096), ("Q4_K", 1024, 2304)])
@pytest.mark.parametrize("M", [1, 8])
def test_cuda_qgemv(qtype, N, K, M):
    p, raw = _gpu_weight(qtype, N, K, 10)
    wd = _gpu_dense(raw, qtype)
    wq = qm.dequantize_gpu(p, qtype, (N, K), out=torch.empty(N, K, device="cuda"))
    torch.testing.assert_close(wq, wd, rtol=1e-6, atol=1e-6 * wd.abs().max().item())  # FMA contraction
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float32)
    qm.qgemv(x, p, qtype, N, out=out)
    torch.cuda.synchronize()
    check(out, qlinear_ref(x, wd), 1e-5)
    out.fill_(float("nan"))
    qm.qgemv(x, p, qtype, N, out=out, method="dot")
    check(out, qlinear_ref(x, wd), 1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("qtype", QUANT + ["BF16"])
@pytest.mark.parametrize("M,contiguous", [(300, True), (2048, False), (8192, True)])
def test_cuda_qgemm(qtype, M, contiguous):
    N, K = 4096, 2304
    if qtype == "BF16":
        wb = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.01
        p, wd = qm.repack(wb, "BF16"), wb.float()
    else:
        p, raw = _gpu_weight(qtype, N, K, 11)
        wd = _gpu_dense(raw, qtype)
    x = (torch.randn(M, K, device="cuda", dtype=torch.bfloat16) if contiguous else
         torch.randn(K, M, device="cuda", dtype=torch.bfloat16).t())
    ref = qlinear_ref(x, wd)
    for method in ["fused", "cublas"]:
        out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        qm.qgemm(x, p, qtype, N, out=out, method=method)
        torch.cuda.synchronize()
        check(out.float(), ref, 1e-2)


@pytest.mark.cuda
def test_cuda_qgemv_graph_capture():
    N, K = 4096, 2304
    p, raw = _gpu_weight("Q4_K", N, K, 12)
    wd = _gpu_dense(raw, "Q4_K")
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
    qm.qgemv(x, p, "Q4_K", N, out=out)  # autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        qm.qgemv(x, p, "Q4_K", N, out=out)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(out.float(), qlinear_ref(x, wd), 1e-2)


# ---- int8 activations (x8): dp4a word path ---------------------------------------------------------
try:
    from kimi_local.kernels.naive import dequantize_x8_ref, quantize_x8_ref
except ImportError:
    from kernels.naive import dequantize_x8_ref, quantize_x8_ref


@pytest.mark.parametrize("K", [16, 160, 2304])
def test_quantize_x8(K):
    g = torch.Generator().manual_seed(K)
    x = torch.randn(K, 3, generator=g)[:, 1] * 3.0  # strided
    x[:16] = 0.0  # an all-zero group: scale 0, values 0
    x8 = torch.full((qm.x8_words(K),), -1, dtype=torch.int32)
    qm.quantize_x8(x, out=x8)
    q, dx = quantize_x8_ref(x)
    got_q = x8[:K // 4].view(torch.int8).float().view(-1, 16)
    assert torch.equal(got_q, q)
    assert torch.equal(x8[K // 4:K // 4 + K // 16].view(torch.float32), dx)
    sq = x8[K // 4 + K // 16:].view(torch.float32)
    torch.testing.assert_close(sq, dx * q.sum(1), rtol=1e-6, atol=1e-6)
    assert torch.equal(qm.dequantize_x8(x8, K), dequantize_x8_ref(x))
    assert ((dequantize_x8_ref(x) - x).abs() <= dx.repeat_interleave(16) / 2 + 1e-7).all()


@pytest.mark.parametrize("qtype,N,K,kw", [
    ("Q4_K", 37, 768, dict(BN=16, C=8, SPLIT=1)),
    ("Q4_K", 20, 768, dict(BN=16, C=16, SPLIT=2)),
    ("Q5_K", 37, 768, dict(BN=16, C=8, SPLIT=1)),
    ("Q5_K", 20, 768, dict(BN=16, C=16, SPLIT=2)),
    ("Q6_K", 19, 768, dict(BN=8, C=4, SPLIT=3)),
    ("Q8_0", 17, 160, dict(BN=8, C=4, SPLIT=2)),
    ("Q8_0", 33, 512, dict(BN=32, C=8, SPLIT=4)),
    ("Q3_K", 11, 768, dict(BN=16, C=4, SPLIT=2)),
    ("Q2_K", 25, 768, dict(BN=8, C=8, SPLIT=2)),
    ("Q4_K", 20, 768, dict(BN=16, C=32, SPLIT=1)),  # one clamped step over 24 chunks
    ("Q8_0", 17, 288, dict(BN=16, C=32, SPLIT=1)),
])
def test_qgemv_x8(qtype, N, K, kw):
    """dp4a word path == dequantized weights @ the int8-rounded x (exact up to fp32 order), and within the
    activation rounding of the fp result; an x8 buffer made beforehand gives the same values."""
    g = torch.Generator().manual_seed(40 + N)
    p, wd = make_weight(qtype, N, K, gen=g)
    x = torch.randn(K, 2, generator=g)[:, 1]
    out = torch.full((N,), float("nan"))
    qm.qgemv(x, p, qtype, N, out=out, method="word", x8=True, **kw)
    check(out, qlinear_ref(dequantize_x8_ref(x), wd), TOL_F32)
    check(out, qlinear_ref(x, wd), 2e-2)
    out2 = torch.full((N,), float("nan"))
    qm.qgemv(x, p, qtype, N, out=out2, method="word", x8=qm.quantize_x8(x), **kw)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("N,K,SPLIT,normed", [(17, 512, 2, False), (33, 1536, 2, False), (9, 1024, 1, True),
                                              (20, 384, 1, False)])  # 384: 24 chunks, one clamped step of 32
def test_qgemv_preload(N, K, SPLIT, normed):
    """PRELOAD (x8 Q8_0: the K slice's weights loaded before the PDL wait, one step) gives the bits of the same one-step
    GEMV without it, and the x8 reference's values; split K and a normed x8 buffer included."""
    g = torch.Generator().manual_seed(70 + N)
    p, wd = make_weight("Q8_0", N, K, gen=g)
    x = torch.randn(K, generator=g)
    chunks = K // SPLIT // 16
    if normed:
        nw = 1 + 0.2 * torch.randn(K, generator=g)
        x8 = torch.empty(qm.x8n_words(K), dtype=torch.int32)
        res = x.clone().to(torch.bfloat16)
        from kimi_local.kernels.norm import add_norm_x8n
        add_norm_x8n(torch.zeros(1, K, dtype=torch.bfloat16), res[None], nw, x8)
        x8 = qm.NormedX8(x8, 1e-5)
    else:
        x8 = qm.quantize_x8(x)
    outs = []
    for pre in (False, True):
        out = torch.full((N,), float("nan"))
        qm.qgemv1(x, p, "Q8_0", N, out=out, BN=4, C=chunks, SPLIT=SPLIT, num_warps=1, x8=x8, preload=pre)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    if not normed:
        check(outs[1], qlinear_ref(dequantize_x8_ref(x), wd), TOL_F32)


@pytest.mark.parametrize("N,K,SPLIT,normed", [(13, 2304, 1, False), (9, 2304, 1, True), (17, 1024, 2, False)])
def test_qgemv_first_step_preload(N, K, SPLIT, normed):
    """FIRST (x8 Q8_0: the first step's weights loaded before the PDL wait, the other steps after it) and PIPE (the
    steps double-buffered in registers), alone and together, give the bits of the same GEMV without them: 144 chunks
    in 9 steps of 16 (the in-projections' K = 2304), split K, a normed x8 buffer."""
    g = torch.Generator().manual_seed(80 + N)
    p, wd = make_weight("Q8_0", N, K, gen=g)
    x = torch.randn(K, generator=g)
    x8 = qm.quantize_x8(x)
    if normed:
        nw = 1 + 0.2 * torch.randn(K, generator=g)
        x8 = torch.empty(qm.x8n_words(K), dtype=torch.int32)
        from kimi_local.kernels.norm import add_norm_x8n
        add_norm_x8n(torch.zeros(1, K, dtype=torch.bfloat16), x.clone().to(torch.bfloat16)[None], nw, x8)
        x8 = qm.NormedX8(x8, 1e-5)
    outs = []
    for first, pipe in ((False, False), (True, False), (False, True), (True, True)):
        out = torch.full((N,), float("nan"))
        qm.qgemv1(x, p, "Q8_0", N, out=out, BN=4, C=16, SPLIT=SPLIT, num_warps=1, x8=x8, first=first, pipe=pipe)
        outs.append(out)
    assert all(torch.equal(outs[0], o) for o in outs[1:]) and not outs[0].isnan().any()
    if not normed:
        check(outs[1], qlinear_ref(dequantize_x8_ref(x), wd), TOL_F32)


def _graph_chain_bitwise(x, N, pdl_on, gemv):
    """3 chained GEMVs, each reading the previous one's output as x8 (gemv(h, x8, out, on)): eager with on=False,
    then in a CUDA graph with on=True (replayed once), PDL as given; asserts both chains' x8 buffers and outputs equal
    bit for bit and returns the eager one [(x8, out)]."""
    from kimi_local.kernels import pdl as P

    def chain(on):
        outs, h = [], x
        for _ in range(3):
            x8 = qm.quantize_x8(h)
            o = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
            gemv(h, x8, o, on)
            outs.append((x8, o))
            h = o
        return outs

    with P.active(pdl_on and P.supported("cuda")):
        want = chain(False)
        chain(True)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            got = chain(True)
        g.replay()
        torch.cuda.synchronize()
    for (w8, wo), (g8, go) in zip(want, got):
        assert torch.equal(g8, w8) and torch.equal(go, wo)
    return want


@pytest.mark.cuda
@pytest.mark.parametrize("pdl_on", [False, True])
@pytest.mark.parametrize("pipe", [False, True])
def test_cuda_qgemv_first_step_preload(pdl_on, pipe):
    """FIRST at the in-projections' K = 2304 (9 steps of 16 chunks), with PIPE or without: a CUDA graph of 3 chained
    [2304, 2304] GEMVs, each reading the previous one's output as x8, equals the same GEMVs without them, bit for
    bit."""
    N = K = 2304
    p, raw = _gpu_weight("Q8_0", N, K, 29)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    _graph_chain_bitwise(x, N, pdl_on, lambda h, x8, o, on: qm.qgemv1(h, p, "Q8_0", N, out=o, x8=x8, first=on,
                                                                        pipe=on and pipe))


@pytest.mark.cuda
@pytest.mark.parametrize("pdl_on", [False, True])
def test_cuda_qgemv_preload(pdl_on):
    """PRELOAD at the o-projection's K ([4096, 4096] Q8_0, PRELOAD_SPLIT K slices), as the engine's default config
    picks it: a chain of 3 GEMVs in a CUDA graph, each reading the previous one's output as x8, equals the same
    one-step GEMVs without it, bit for bit, and the x8 reference."""
    N = K = 4096  # square, so that each output can feed the next GEMV
    p, raw = _gpu_weight("Q8_0", N, K, 19)
    wd = _gpu_dense(raw, "Q8_0")
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    want = _graph_chain_bitwise(x, N, pdl_on, lambda h, x8, o, on: qm.qgemv1(
        h, p, "Q8_0", N, out=o, BN=4, C=4096 // 16 // qm.PRELOAD_SPLIT, SPLIT=qm.PRELOAD_SPLIT, num_warps=1, x8=x8,
        preload=on))
    check(want[0][1].float(), qlinear_ref(qm.dequantize_x8(want[0][0], K)[None], wd), 1e-2)
    # the engine's call (no knobs): the default config with PRELOAD picks the one-step slices above
    o = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
    qm.qgemv(x, p, "Q8_0", N, out=o, x8=want[0][0])
    torch.cuda.synchronize()
    assert torch.equal(o, want[0][1])


@pytest.mark.cuda
@pytest.mark.parametrize("qtype,N,K", [("Q6_K", 163840, 2304), ("Q8_0", 163840, 2304), ("Q8_0", 12576, 2304), ("Q8_0", 2304, 4096),
                                       ("Q5_K", 4096, 2304), ("Q4_K", 1024, 2304), ("Q3_K", 2304, 4096),
                                       ("Q2_K", 1024, 2304)])
def test_cuda_qgemv_x8(qtype, N, K):
    """dp4a path at real shapes: the GPU's int8 rounding equals the reference's (but for rare ties under FMA
    contraction), and the GEMV equals the dequantized weights times those int8 activations."""
    p, raw = _gpu_weight(qtype, N, K, 13)
    wd = _gpu_dense(raw, qtype)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    x8 = qm.quantize_x8(x)
    q_ref, _ = quantize_x8_ref(x[0])
    assert (x8[:K // 4].view(torch.int8).float().view(-1, 16) != q_ref).sum().item() <= K // 1000
    out = torch.full((1, N), float("nan"), device="cuda", dtype=torch.float32)
    qm.qgemv(x, p, qtype, N, out=out, x8=x8)
    torch.cuda.synchronize()
    check(out, qlinear_ref(qm.dequantize_x8(x8, K)[None], wd), 1e-5)
    check(out, qlinear_ref(x, wd), 2e-2)


@pytest.mark.parametrize("qtype,N,K,kw", [
    ("Q8_0", 17, 160, dict(BN=8, C=4, SPLIT=2)),  # split K: every split scales its partial
    ("Q4_K", 37, 768, dict(BN=16, C=8, SPLIT=1)),
    ("Q6_K", 19, 768, dict(BN=8, C=4, SPLIT=3)),
])
def test_qgemv_normed_x8(qtype, N, K, kw):
    """A normed x8 buffer (norm.add_norm_x8n: residual add, then the x8 groups of x * w and the groups' sums of
    x^2): the residual is updated as rms_norm's fused add rounds it, and the GEMV that applies 1 / rms equals the
    GEMV of the normalised row within the x8 rounding."""
    import importlib
    norm = importlib.import_module(qm.__package__ + ".norm")
    rms_norm = importlib.import_module(qm.__package__ + ".naive").rms_norm
    g = torch.Generator().manual_seed(70 + N)
    p, wd = make_weight(qtype, N, K, gen=g)
    res = (torch.randn(K, generator=g) * 2).bfloat16()
    v = torch.randn(K, generator=g).bfloat16()
    nw = (1 + 0.3 * torch.randn(K, generator=g)).bfloat16().float()  # exact in bf16 (the interpreter truncates)
    eps = 1e-5
    want_res = (res.float() + v.float()).bfloat16()
    x8n = torch.full((qm.x8n_words(K),), -1, dtype=torch.int32)
    r = res.clone()
    norm.add_norm_x8n(v, r, nw, x8n)
    torch.testing.assert_close(r.float(), want_res.float(), rtol=2 ** -7, atol=0)  # the interpreter truncates
    xs = r.float()
    ss = x8n[qm.x8_words(K):].view(torch.float32)
    torch.testing.assert_close(ss, (xs * xs).view(-1, 16).sum(1), rtol=1e-6, atol=0)
    xw = xs * nw.bfloat16().float()
    torch.testing.assert_close(qm.dequantize_x8(x8n[:qm.x8_words(K)], K), dequantize_x8_ref(xw), rtol=1e-6, atol=1e-6)
    out = torch.full((N,), float("nan"))
    qm.qgemv(r[None], p, qtype, N, out=out[None], method="word", x8=qm.NormedX8(x8n, eps), **kw)
    h = rms_norm(xs, nw, eps)
    check(out, qlinear_ref(h, wd), 2e-2)
    xq = qm.dequantize_x8(x8n[:qm.x8_words(K)], K)  # what the buffer holds, times 1 / rms: the GEMV exactly
    check(out, qlinear_ref(xq * torch.rsqrt((xs * xs).mean() + eps), wd), TOL_F32)
    with pytest.raises(ValueError, match="word path"):  # other readers would read x itself, not the buffer
        qm.qgemv(r[None].repeat(2, 1), p, qtype, N, x8=qm.NormedX8(x8n, eps))


@pytest.mark.cuda
@pytest.mark.parametrize("qtype,N,K", [("Q8_0", 12576, 2304), ("Q6_K", 12576, 2304), ("Q8_0", 5184, 2304),
                                       ("Q4_K", 6144, 2304)])
def test_cuda_qgemv_normed_x8(qtype, N, K):
    """A normed x8 buffer at the engine's projection shapes (KDA q/k/v/f_a/g_a/beta, MLA q/kv_a): the GEMV that
    applies 1 / rms equals the dequantized weights times the buffer's values over the rms, and is within the x8
    rounding of the GEMV of the normalised row."""
    from kimi_local.kernels.naive import rms_norm
    from kimi_local.kernels.norm import add_norm_x8n
    p, raw = _gpu_weight(qtype, N, K, 17)
    wd = _gpu_dense(raw, qtype)
    res = torch.randn(1, K, device="cuda").bfloat16()
    v = torch.randn(1, K, device="cuda").bfloat16()
    nw = 1 + 0.3 * torch.randn(K, device="cuda")
    x8n = torch.full((qm.x8n_words(K),), -1, dtype=torch.int32, device="cuda")
    add_norm_x8n(v, res, nw, x8n)
    out = torch.full((1, N), float("nan"), device="cuda", dtype=torch.float32)
    qm.qgemv(res, p, qtype, N, out=out, x8=qm.NormedX8(x8n, 1e-5))
    torch.cuda.synchronize()
    xs = res[0].float()
    r = torch.rsqrt((xs * xs).mean() + 1e-5)
    check(out, qlinear_ref(qm.dequantize_x8(x8n[:qm.x8_words(K)], K)[None] * r, wd), 1e-5)
    check(out, qlinear_ref(rms_norm(res, nw, 1e-5).float(), wd), 2e-2)
