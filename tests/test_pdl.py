"""Programmatic dependent launch (kernels/pdl.py): off where it cannot work; on the GPU, a CUDA graph of
dependent PDL-launched kernels (GEMVs with split-K and the L2 prefetch, norm, router, MoE) gives results
bit-identical to the same graph without PDL (a wait in the wrong place would read stale inputs)."""
import os
import sys
from pathlib import Path

import pytest
import torch

try:
    from kimi_local.kernels import mla, moe, norm, pdl, quant_matmul as qm, router
except ImportError:  # not pip-installed (device machine): import the source dirs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import mla, moe, norm, pdl, quant_matmul as qm, router

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_quant_matmul import random_blocks  # noqa: E402


def test_pdl_off_on_cpu_and_under_interpreter(monkeypatch):
    assert not pdl.supported("cpu")
    with pdl.active(True):
        if os.environ.get("TRITON_INTERPRET") == "1" or not pdl.AVAILABLE:
            assert not pdl.enabled() and pdl.launch_kw() == {} and not pdl.prefetch()
        else:
            assert pdl.enabled() and pdl.launch_kw() == {"launch_pdl": True}
            assert not pdl.prefetch()  # off unless asked for
            monkeypatch.setenv("KIMI_LOCAL_PREFETCH", "1")
            assert pdl.prefetch()
    assert not pdl.enabled() and pdl.launch_kw() == {}
    monkeypatch.setenv("KIMI_LOCAL_PDL", "0")
    assert not pdl.supported("cuda")


def test_carveout_knob(monkeypatch):
    """KIMI_LOCAL_CARVEOUT: 0 / unset = the driver's choice (the load hook does nothing); the hook registers once;
    a missing function handle or a zero percent never reaches the driver."""
    from kimi_local.kernels import carveout
    monkeypatch.delenv("KIMI_LOCAL_CARVEOUT", raising=False)
    assert carveout.percent() == 0
    monkeypatch.setenv("KIMI_LOCAL_CARVEOUT", "")
    assert carveout.percent() == 0
    monkeypatch.setenv("KIMI_LOCAL_CARVEOUT", "44")
    assert carveout.percent() == 44
    carveout.install()
    carveout.install()
    from triton import knobs
    assert knobs.runtime.kernel_load_end_hook.calls.count(carveout._on_load) == 1
    carveout.set_function(0, 44)  # no handle: no driver call (this machine may have no libcuda)
    carveout.set_function(12345, 0)
    carveout.set_kernel(object(), 44)
    assert not carveout._DONE


def test_mla_pdl_switch(monkeypatch):
    """The MLA decode kernels launch with PDL while the rest of the step does, unless KIMI_LOCAL_MLA_PDL=0."""
    monkeypatch.delenv("KIMI_LOCAL_MLA_PDL", raising=False)
    monkeypatch.setattr(pdl, "_ON", True)
    assert mla._pdl_kw() == {"PDL": True, "launch_pdl": True} and pdl.launch_kw() == {"launch_pdl": True}
    monkeypatch.setenv("KIMI_LOCAL_MLA_PDL", "0")
    assert mla._pdl_kw() == {"PDL": False}
    monkeypatch.setenv("KIMI_LOCAL_MLA_PDL", "1")
    assert mla._pdl_kw() == {"PDL": True, "launch_pdl": True}
    monkeypatch.setattr(pdl, "_ON", False)
    assert mla._pdl_kw() == {"PDL": False}


def _packed(qtype, N, K, seed, lead=1):
    """Packed random weight [N, K], or `lead` independent matrices [lead, N, ...] (an expert pool: the
    struct-of-arrays repack is per matrix)."""
    g = torch.Generator().manual_seed(seed)
    raw = random_blocks(qtype, lead * N, K, "cuda", g, scale=3e-4)
    if lead == 1:
        return qm.repack(raw, qtype)
    return qm.repack(raw.view(lead, N, -1), qtype)


@pytest.mark.cuda
@pytest.mark.parametrize("prefetch", ["1", "0"])
def test_pdl_chain_bitwise_equal(monkeypatch, prefetch):
    if not pdl.supported("cuda"):
        pytest.skip("PDL needs sm_90+ and Triton >= 3.4")
    monkeypatch.setenv("KIMI_LOCAL_PREFETCH", prefetch)
    D, F, E, k = 2304, 1024, 64, 8
    types = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
    mats = [(_packed(t, 4096 if i % 2 == 0 else D, D, i), t, 4096 if i % 2 == 0 else D) for i, t in enumerate(types)]
    back = [(_packed(t, D, 4096, 10 + i), t) for i, t in enumerate(types)]  # 4096 -> D
    nw = torch.rand(D, device="cuda") + 0.5
    rw = torch.randn(E, D, device="cuda", dtype=torch.bfloat16) * 0.05
    rb = torch.randn(E, device="cuda") * 0.1
    pools = [_packed(q, r, c, 20 + j, lead=E) for j, (q, r, c) in
             enumerate(zip(("Q4_K", "Q4_K", "Q5_K"), (F, F, D), (D, D, F)))]
    shared = [_packed("Q8_0", r, c, 30 + j) for j, (r, c) in enumerate(((F, D), (F, D), (D, F)))]
    x0 = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    h = torch.empty(1, D, device="cuda", dtype=torch.bfloat16)
    res = torch.empty(1, D, device="cuda", dtype=torch.bfloat16)
    big = torch.empty(1, 4096, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(1, D, device="cuda", dtype=torch.bfloat16)
    logits = torch.empty(1, E, device="cuda")
    ids = torch.empty(1, k, device="cuda", dtype=torch.int32)
    wts = torch.empty(1, k, device="cuda")

    h2 = torch.empty(1, D, device="cuda", dtype=torch.bfloat16)
    big2 = torch.empty(1, 4096, device="cuda", dtype=torch.bfloat16)
    nw4 = torch.rand(4096, device="cuda") + 0.5

    def chain():
        # norm -> GEMV (-> norm -> GEMV) -> norm -> router -> route -> MoE, 6 times; every stage's output is
        # RMS-normalised before the next (random weights would overflow otherwise)
        res.copy_(x0)
        y.copy_(x0)
        for (w1, t1, n1), (w2, t2) in zip(mats, back):
            norm.rms_norm(y, nw, 1e-6, out=h, residual=res)
            if n1 == 4096:
                qm.qgemv(h, w1, t1, n1, out=big)
                norm.rms_norm(big, nw4, 1e-6, out=big2)
                qm.qgemv(big2, w2, t2, D, out=y)
            else:
                qm.qgemv(h, w1, t1, n1, out=y)
            norm.rms_norm(y, nw, 1e-6, out=h2)
            router.router_logits(h2, rw, out=logits)
            router.route(logits, rb, k, 2.5, ids_out=ids, w_out=wts)
            moe.moe_decode(h2[0], ids[0], wts[0], *pools, ("Q4_K", "Q4_K", "Q5_K"), y[0], shared=shared,
                           shared_qtypes=("Q8_0", "Q8_0", "Q8_0"))
        return torch.cat([y.float(), res.float(), logits, wts, ids.float()], 1).clone()

    outs = []
    for on in (True, False):
        with pdl.active(on):
            chain()  # warm-up: compile, workspaces
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = chain()
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        outs.append(out.clone())
    assert torch.isfinite(outs[0]).all() and outs[0][0, :D].abs().max() > 0
    assert torch.equal(outs[0], outs[1])
