"""Run the Gluon MoE prefill GEMMs once each, after a warm-up, for Nsight Compute (ncu) to inspect.

Q4_K experts 256 x [1024, 2304] x 3, top-8 of T tokens routed uniformly at random (as scripts/bench_kernels.py
--only moe_prefill), tiles as moe.moe_prefill cuts them: gate/up's BM-row tiles, then its small tiles, then the
same for down. Profiling starts after the warm-up (cudaProfilerStart). Usage on the device:

    ncu --clock-control none --profile-from-start off --set detailed python3 scripts/ncu_moe_prefill.py --T 8192
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernels import _moe_pools  # noqa: E402
from kimi_local.kernels import moe  # noqa: E402
from kimi_local.kernels import moe_prefill_gluon as PG  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--split", type=int, default=1, help="1: small tiles as moe_prefill; 0: BM tiles only")
    a = ap.parse_args()
    S, D, Fe, k, T = 256, 2304, 1024, 8, a.T
    pools = _moe_pools(("Q4_K",) * 3, S, D, Fe)
    torch.manual_seed(0)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(T, S, device="cuda").topk(k, dim=1).indices
    wf = torch.rand(T * k, device="cuda")
    bm = moe.prefill_tile_rows(T * k, S)
    bmd = min(bm, PG.DOWN_MAX_BM)
    h = torch.empty(T * k, Fe, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(T * k, D, device="cuda", dtype=torch.float32)

    srt = moe.moe_route_sort(ids, S)
    asg = srt[0]
    gu, dn = (moe.prefill_tiles(ids, S, b, moe.prefill_split(b) if a.split else 0, srt) for b in (bm, bmd))
    tok = asg // k
    print(f"T={T} gate/up tiles {[(b, int((t[0] < S).sum())) for b, t in gu]}, "
          f"down {[(b, int((t[0] < S).sum())) for b, t in dn]}")

    def run():
        for b, (ts, r0, r1) in gu:
            PG.gate_up(x, tok, ts, r0, r1, pools[0], pools[1], h, "Q4_K", b)
        for b, (ts, r0, r1) in dn:
            PG.down(h, asg, wf, ts, r0, r1, pools[2], y, "Q4_K", b)

    run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
