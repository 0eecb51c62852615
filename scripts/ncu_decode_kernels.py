"""Run the decode step's biggest kernels a few times each, eagerly, for Nsight Compute (ncu) to inspect.

Shapes and types are the Q4_K_M recipe's: fused MoE (8 experts Q4_K/Q4_K/Q5_K + Q8_0 shared), the KDA
q/k/v/f/g/beta GEMV [12288+, 2304] Q8_0, an o-projection [2304, 4096] Q8_0 and lm_head [163840, 2304]
Q6_K. Each kernel runs `--reps` times over different weight copies (cold in L2 for ncu's default cache
control anyway). Usage on the device:

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
from kimi_local.kernels import moe  # noqa: E402
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
    torch.cuda.synchronize()
    print("done")


if __name__ == "__main__":
    main()
