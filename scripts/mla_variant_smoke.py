"""Run one MLA decode configuration at real shapes and check it against the fp32 reference (GPU; one process per
configuration, so a crashing configuration does not take the others down).

    python3 scripts/mla_variant_smoke.py VARIANT BS NUM_WARPS NUM_STAGES [N ...]
"""
import math
import sys
from pathlib import Path

import torch

try:
    from kimi_local.kernels import mla, naive
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import mla, naive


def main():
    v, bs, nw, st = sys.argv[1], *map(int, sys.argv[2:5])
    sizes = [int(a) for a in sys.argv[5:]] or [1, 7, 4097, 131072]
    H, R, DR = 32, 512, 64
    for n in sizes:
        g = torch.Generator(device="cuda").manual_seed(n)
        lat = torch.randn(n, R + DR, device="cuda", generator=g).to(torch.bfloat16)
        q_abs = (torch.randn(H, R, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
        q_pe = torch.randn(H, DR, device="cuda", generator=g).to(torch.bfloat16)
        ref = naive.mla_latent_attend(q_abs.float(), q_pe.float(), lat[:, :R].float(), lat[:, R:].float(),
                                      1 / math.sqrt(192))
        out = torch.full((H, R), float("nan"), device="cuda")
        mla.mla_decode(q_abs, q_pe, lat, torch.tensor([n], dtype=torch.int32, device="cuda"), 1 / math.sqrt(192),
                       out, variant=v, BS=bs, num_warps=nw, num_stages=st)
        torch.cuda.synchronize()
        err = ((out - ref).norm() / ref.norm()).item()
        print(f"{v} BS={bs} w{nw} s{st} n={n}: rel err {err:.2e}", "ok" if err < 1e-2 else "WRONG", flush=True)


if __name__ == "__main__":
    main()
