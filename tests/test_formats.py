"""quant/formats.py against gguf-py (the external oracle for ggml block layouts) and error bounds.

`python tests/test_formats.py` prints the error/time table kept in docs/perf-notes.md.
"""
import time

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from kimi_local.quant.formats import QTYPES, QTensor, dequantize, quantize, row_nbytes

BLOCK_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
QUANT_TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]  # best to worst
FLOAT_TYPES = ["F32", "F16", "BF16"]
# byte ranges of the fp16 scale fields in one block
FP16_FIELDS = {
    "Q8_0": [(0, 2)], "Q4_0": [(0, 2)], "Q4_1": [(0, 4)], "Q5_0": [(0, 2)], "Q5_1": [(0, 4)],
    "Q2_K": [(80, 84)], "Q3_K": [(108, 110)], "Q4_K": [(0, 4)], "Q5_K": [(0, 4)], "Q6_K": [(208, 210)],
}
# relative RMSE of quantize -> dequantize on _gaussian(), measured (Q8_0 0.00534, Q6_K 0.01735, Q5_K 0.0362,
# Q4_K 0.07183, Q3_K 0.1449, Q2_K 0.27547) times ~1.03
RMSE_BOUND = {"Q8_0": 0.0055, "Q6_K": 0.0179, "Q5_K": 0.0373, "Q4_K": 0.0740, "Q3_K": 0.1493, "Q2_K": 0.2838}
SEARCH_GAIN = 0.03  # the K-quant scale search beats plain min/max scales by >= 5 % (measured), assert 3 %


def _gaussian(rows=64, n=2304, seed=0):
    return torch.randn(rows, n, generator=torch.Generator().manual_seed(seed))


def _student_t(rows=64, n=2304, seed=1, df=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, n, generator=g)
    chi2 = torch.randn(rows, n, int(df), generator=g).pow(2).sum(-1)
    return z / (chi2 / df).sqrt()


def _rel_rmse(y, x):
    return ((y - x).pow(2).mean() / x.pow(2).mean()).sqrt().item()


def _oracle(data: torch.Tensor, qtype: str) -> np.ndarray:
    return gq.dequantize(data.numpy(), GGMLQuantizationType[qtype])


def _assert_bits_equal(mine: torch.Tensor, ref: np.ndarray):
    assert tuple(mine.shape) == ref.shape
    a = mine.numpy().astype(np.float32).view(np.uint32)
    b = np.ascontiguousarray(ref, dtype=np.float32).view(np.uint32)
    bad = np.flatnonzero(a != b)
    assert bad.size == 0, f"{bad.size} values differ, first at flat index {bad[0]}"


def _random_blocks(qtype, lead, nblocks, seed):
    """Random bytes [*lead, nblocks * type_size] with every fp16 scale field set to a finite value."""
    q = QTYPES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (*lead, nblocks, q.type_size), dtype=np.uint8)
    for lo, hi in FP16_FIELDS[qtype]:
        scales = (rng.standard_normal((*lead, nblocks, (hi - lo) // 2)) * 0.05).astype(np.float16)
        raw[..., lo:hi] = scales.view(np.uint8)
    return torch.from_numpy(raw.reshape(*lead, nblocks * q.type_size))


def test_qtypes_match_gguf():
    for name, q in QTYPES.items():
        gt = GGMLQuantizationType[name]
        assert q.ggml_id == gt.value
        assert (q.block_size, q.type_size) == GGML_QUANT_SIZES[gt]
    assert row_nbytes("Q4_K", 2304) == 9 * 144
    assert row_nbytes("Q8_0", 64) == 68
    assert row_nbytes("BF16", 5) == 10


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
@pytest.mark.parametrize("lead", [(7,), (3, 5)])
def test_dequantize_random_blocks_bit_exact(qtype, lead):
    data = _random_blocks(qtype, lead, 3, seed=hash((qtype, lead)) % 2**32)
    _assert_bits_equal(dequantize(data, qtype), _oracle(data, qtype))


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_dequantize_own_blocks_bit_exact(qtype):
    x = torch.cat([_gaussian(9, 512) * 0.02, _student_t(9, 512), torch.zeros(1, 512), torch.full((1, 512), -0.3)])
    data = quantize(x.view(4, 5, 512), qtype)  # odd rows, 3-D
    assert data.shape == (4, 5, row_nbytes(qtype, 512))
    _assert_bits_equal(dequantize(data, qtype), _oracle(data, qtype))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0"])
def test_dequantize_gguf_quantized_blocks(qtype):
    # dequantize-only types: blocks made by gguf-py's own quantizer
    x = _gaussian(5, 256).numpy()
    data = torch.from_numpy(gq.quantize(x, GGMLQuantizationType[qtype]))
    _assert_bits_equal(dequantize(data, qtype), _oracle(data, qtype))


def _edge_values():
    x = _gaussian(6, 256)
    x[1] *= 1e-6
    x[2] *= 1e5
    x[3, ::7] = 0.5
    x[4] = (torch.arange(256) - 127.5).clamp(-127, 127)  # d = 1: exact .5 ties for roundf
    x[5] = 0
    return x


def test_q8_0_quantize_matches_gguf():
    x = torch.cat([_gaussian(7, 256), _edge_values()])
    ref = gq.quantize(x.numpy(), GGMLQuantizationType.Q8_0)
    assert np.array_equal(quantize(x, "Q8_0").numpy(), ref)


def test_float_types_match_gguf():
    x = _edge_values()
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0e38])
    x[0, 4] = torch.tensor(1.00390625 + 2**-9)  # bf16 tie -> even
    ref_bf16 = gq.quantize(x.numpy(), GGMLQuantizationType.BF16).view(np.uint8).reshape(x.shape[0], -1)
    assert np.array_equal(quantize(x, "BF16").numpy(), ref_bf16)
    with np.errstate(over="ignore"):
        ref_f16 = x.numpy().astype(np.float16).view(np.uint8)
    assert np.array_equal(quantize(x, "F16").numpy(), ref_f16)
    assert np.array_equal(quantize(x, "F32").numpy(), x.numpy().view(np.uint8))
    for qtype in FLOAT_TYPES:
        data = quantize(x[1:], qtype)
        _assert_bits_equal(dequantize(data, qtype), _oracle(data, qtype).reshape(x[1:].shape))


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_error_bounds(qtype):
    x = _gaussian()
    err = _rel_rmse(dequantize(quantize(x, qtype), qtype), x)
    assert err < RMSE_BOUND[qtype]
    if qtype != "Q8_0":  # the scale search must keep its advantage over plain min/max scales
        plain = _rel_rmse(dequantize(quantize(x, qtype, search=False), qtype), x)
        assert err < (1 - SEARCH_GAIN) * plain


def test_quality_is_monotone():
    for x in (_gaussian(), _student_t()):
        errs = [_rel_rmse(dequantize(quantize(x, q), q), x) for q in QUANT_TYPES]
        assert errs == sorted(errs), dict(zip(QUANT_TYPES, errs))


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES)
def test_zero_and_constant_rows(qtype):
    x = torch.stack([torch.zeros(256), torch.full((256,), 0.75), torch.full((256,), -2.5), torch.full((256,), 1e-20)])
    y = dequantize(quantize(x, qtype), qtype)
    assert torch.isfinite(y).all()
    assert (y[0] == 0).all()
    assert torch.allclose(y[1:3], x[1:3], rtol=2e-2, atol=0)


def test_non_contiguous_input_and_dtype():
    x = _gaussian(256, 64).t()  # [64, 256] non-contiguous
    assert torch.equal(quantize(x, "Q4_K"), quantize(x.contiguous(), "Q4_K"))
    data = quantize(x, "Q6_K")
    assert dequantize(data, "Q6_K", dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(quantize(x.half(), "Q8_0"), quantize(x.half().float(), "Q8_0"))


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="multiple of 256"):
        row_nbytes("Q4_K", 2300)
    with pytest.raises(ValueError, match="multiple of 32"):
        row_nbytes("Q8_0", 48)
    with pytest.raises(ValueError, match="unknown quantization type"):
        row_nbytes("Q7_K", 256)
    with pytest.raises(ValueError):
        quantize(torch.zeros(2, 100), "Q6_K")
    with pytest.raises(ValueError, match="hold 256 values"):
        dequantize(torch.zeros(2, 144, dtype=torch.uint8), "Q4_K", n=512)
    with pytest.raises(ValueError, match="144-byte blocks"):
        dequantize(torch.zeros(2, 100, dtype=torch.uint8), "Q4_K")
    with pytest.raises(NotImplementedError, match="dequantize-only"):
        quantize(torch.zeros(1, 32), "Q4_0")


def test_qtensor():
    w = _gaussian(3 * 5, 512).view(3, 5, 512)  # [E, out, in]
    q = QTensor.from_float(w, "Q4_K")
    assert q.shape == (3, 5, 512) and q.qtype == "Q4_K" and q.device.type == "cpu"
    assert q.data.shape == (3, 5, 2 * 144) and q.nbytes == 3 * 5 * 2 * 144
    full = q.dequantize()
    assert full.shape == w.shape
    assert q[1].shape == (5, 512) and torch.equal(q[1].dequantize(), full[1])
    assert q[1:3].shape == (2, 5, 512) and torch.equal(q[1:3].dequantize(), full[1:3])
    assert q[:, 2].shape == (3, 512) and torch.equal(q[:, 2].dequantize(), full[:, 2])
    assert q[..., 4].shape == (3, 512) and torch.equal(q[..., 4].dequantize(), full[:, 4])
    assert q[torch.tensor([2, 0])].shape == (2, 5, 512)
    assert q[0, 1].shape == (512,)
    with pytest.raises(IndexError):
        q[0, 1, 2]
    assert q.to("cpu").shape == q.shape
    assert q.dequantize(torch.float16).dtype == torch.float16

    plain = QTensor(w.to(torch.bfloat16), "BF16", w.shape)  # plain float tensor accepted for float types
    assert plain.data.dtype == torch.uint8 and torch.equal(plain.dequantize(), w.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="must be uint8"):
        QTensor(q.data[..., :-1], "Q4_K", (3, 5, 512))


@pytest.mark.cuda
@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_cuda_matches_cpu(qtype):
    data = _random_blocks(qtype, (33,), 4, seed=3)
    assert torch.equal(dequantize(data.cuda(), qtype).cpu(), dequantize(data, qtype))
    if qtype in QUANT_TYPES:
        x = _student_t(33, 1024)
        qc = quantize(x.cuda(), qtype).cpu()
        _assert_bits_equal(dequantize(qc, qtype), _oracle(qc, qtype))
        if qtype == "Q8_0":
            assert torch.equal(qc, quantize(x, qtype))
        # sums reduce in another order on the GPU: a few bytes differ (< 0.3 %), the error must not
        assert _rel_rmse(dequantize(qc, qtype), x) == pytest.approx(
            _rel_rmse(dequantize(quantize(x, qtype), qtype), x), rel=0.01)


def _report(rows=1024, n=2304):
    """Markdown table for docs/perf-notes.md: error (search vs plain min/max) and quantize time per type."""
    data = {"Gaussian": _gaussian(rows, n, seed=10), "Student-t df=3": _student_t(rows, n, seed=11)}
    print(f"| type | bits/weight | rel. RMSE Gaussian (search / plain) | rel. RMSE Student-t (search / plain) "
          f"| quantize [{rows}, {n}], wall (CPU) search / plain |")
    print("|---|---|---|---|---|")
    for qtype in QUANT_TYPES:
        q = QTYPES[qtype]
        cells = []
        for x in data.values():
            e = [_rel_rmse(dequantize(quantize(x, qtype, search=s), qtype), x) for s in (True, False)]
            cells.append(f"{e[0]:.4f} / {e[1]:.4f} ({100 * (1 - e[0] / e[1]):.1f} % lower)")
        times = []
        for s in (True, False):  # best of 5: wall seconds and process CPU seconds (both threads)
            runs = []
            for _ in range(5):
                t0, c0 = time.perf_counter(), time.process_time()
                quantize(data["Gaussian"], qtype, search=s)
                runs.append((time.perf_counter() - t0, time.process_time() - c0))
            times.append("{:.2f} s ({:.2f} CPU-s)".format(*min(runs)))
        print(f"| {qtype} | {8 * q.type_size / q.block_size:.4g} | {cells[0]} | {cells[1]} | {' / '.join(times)} |")


if __name__ == "__main__":
    _report()
