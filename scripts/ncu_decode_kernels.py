"""Run the decode step's biggest kernels a few times each, eagerly, for Nsight Compute (ncu) to inspect.

Shapes and types are the Q4_K_M recipe's: fused MoE (8 experts Q4_K/Q4_K/Q5_K + Q8_0 shared), the KDA
q/k/v/f/g/beta GEMV [12288+, 2304] Q8_0, an o-projection [2304, 4096] Q8_0 and lm_head [163840, 2304]
Q6_K; `--only kda` the KDA decode step as the engine runs it (fused gates, x8 output) and unfused (#4's row), each
with the cluster exchange on sm_90. Each kernel runs `--reps` times over different weight copies (cold in L2 for
ncu's default cache control anyway). Usage on the device:

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python3 scripts/ncu_decode_kernels.py
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernels import rand_packed  # noqa: E402
from kimi_local.kernels import kda, moe  # noqa: E402
from kimi_local.kernels import quant_matmul as qm  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", default="moe,qkv,o,lm_head")
    a = ap.parse_args()
    only = a.only.split(",")
    D, Fe, k = 2304, 1024, 8
    x = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    if "moe" in only:
        qt = ("Q4_K", "Q4_K", "Q5_K")
        shq = ("Q8_0", "Q8_0", "Q8_0")
        pools = [rand_packed(q, (64,), r, c) for q, r, c in zip(qt, (Fe, Fe, D), (D, D, Fe))]
        shared = [rand_packed(q, (), r, c) for q, r, c in zip(shq, (Fe, Fe, D), (D, D, Fe))]
        out = torch.empty(D, device="cuda", dtype=torch.bfloat16)
        for r in range(a.reps + 1):
            slots = torch.randperm(64, device="cuda")[:k].to(torch.int32)
            wts = torch.rand(k, device="cuda")
            moe.moe_decode(x, slots, wts, *pools, qt, out, shared=shared, shared_qtypes=shq)
    for name, N, K, q in [("qkv", 12288 + 2 * 128 + 32, 2304, "Q8_0"), ("o", 2304, 4096, "Q8_0"),
                          ("lm_head", 163840, 2304, "Q6_K")]:
        if name not in only:
            continue
        ws = [rand_packed(q, (), N, K) for _ in range(2)]
        xi = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        for r in range(a.reps + 1):
            qm.qgemv(xi, ws[r % 2], q, N)
    if "kda" in only:
        run_kda(a.reps)
    torch.cuda.synchronize()
    print("done")


def run_kda(reps: int, dev: str = "cuda"):
    """The KDA step at the model's shapes (H = 32, K = V = 128, conv 4, ranks 128): fused (the engine's) and unfused."""
    H, K, V, W, R = 32, 128, 128, 4, 128
    P, bf = H * K, torch.bfloat16
    conv_w = [torch.randn(P, W, device=dev) * 0.3 for _ in range(3)]
    tails = [torch.randn(P, W - 1, device=dev).to(bf) for _ in range(3)]
    a, dt_bias, norm_w = -torch.rand(H, device=dev) - 0.1, torch.randn(P, device=dev), torch.rand(V, device=dev)
    q, k, v, f, z = (torch.randn(P, device=dev).to(bf) for _ in range(5))
    beta, fg = torch.randn(H, device=dev).to(bf), torch.randn(2 * R, device=dev).to(bf)
    f_b, g_b = ((torch.randn(P, R, device=dev) * R**-0.5).to(bf) for _ in range(2))
    out, o8 = torch.empty(P, device=dev, dtype=bf), torch.empty(qm.x8_words(P), dtype=torch.int32, device=dev)
    states = [torch.randn(H, K, V, device=dev) * 0.05 for _ in range(2)]
    for r in range(reps + 1):
        kda.kda_decode_step(q, k, v, None, beta, None, conv_w, tails, a, dt_bias, norm_w, states[r % 2], out, 1e-5,
                            out8=o8, fg_a=fg, f_b=f_b, g_b=g_b)
        kda.kda_decode_step(q, k, v, f, beta, z, conv_w, tails, a, dt_bias, norm_w, states[r % 2], out, 1e-5)


if __name__ == "__main__":
    main()
