"""Where does an MLA decode layer's attention time go? The engine's call (kernels/mla.py mla_decode with W_UV and
o's x8 groups: the Gluon split kernel, then the combine + v_b launch) timed whole and launch by launch, at the real
head shapes (32 heads, R = 512, Dr = 64, Dv = 128, bf16 cache), beside the split count and combine tile variants.

    python3 scripts/bench_mla_parts.py [--ctx 4096,131072,1048576]

Each row is a CUDA graph over several cache copies (more than the 50 MB L2 in all), median us per call; "% of copy"
is the latent bytes (S x 1,152 B) over the call's time against the copy bandwidth measured in the same run ("-" for
the combine launches, which do not read the latent).
"""
import argparse
import math
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sweep_gemv import graph_time  # noqa: E402
from kimi_local.bench import hbm_bandwidth  # noqa: E402
from kimi_local.kernels import mla, mla_gluon  # noqa: E402
from kimi_local.kernels.quant_matmul import x8_words  # noqa: E402

H, R, DR, DV = 32, 512, 64, 128


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", default="4096,131072,1048576")
    args = ap.parse_args()
    bw = hbm_bandwidth("cuda") / 1e9
    print(f"copy {bw:.0f} GB/s", flush=True)
    scale = 1 / math.sqrt(192)
    g = torch.Generator(device="cuda").manual_seed(0)
    q_abs = (torch.randn(H, R, device="cuda", generator=g) * 0.05).bfloat16()
    q_pe = torch.randn(H, DR, device="cuda", generator=g).bfloat16()
    v_b = (torch.randn(H, DV, R, device="cuda", generator=g) * 0.05).bfloat16()
    o = torch.empty(H * DV, device="cuda", dtype=torch.bfloat16)
    o8 = torch.empty(x8_words(H * DV), device="cuda", dtype=torch.int32)
    print("| S | part | us per call | % of copy |\n|---|---|---|---|")
    for S in (int(s) for s in args.ctx.split(",")):
        nbytes = S * (R + DR) * 2
        n = max(2, min(16, math.ceil(80e6 / nbytes)))
        lats = [(torch.randn(S, R + DR, device="cuda", generator=g)).bfloat16() for _ in range(n)]
        seq = torch.tensor([S], dtype=torch.int32, device="cuda")
        ns0 = mla.default_splits(q_abs.device)
        ref = mla.mla_decode(q_abs, q_pe, lats[0], seq, scale, v_b=v_b, o=o.clone())

        def row(name, fn, reads_latent=True):
            us = graph_time([lambda lat=lat: fn(lat) for lat in lats], False) * 1e3
            share = f"{100 * nbytes / us * 1e-3 / bw:.1f}" if reads_latent else "-"
            print(f"| {S} | {name} | {us:.2f} | {share} |", flush=True)

        def engine(lat, ns=None, br=None):
            mla.mla_decode(q_abs, q_pe, lat, seq, scale, v_b=v_b, o=o, o8=o8, num_splits=ns, combine_BR=br)

        row("engine call (split + combine_vo)", engine)
        for ns in (ns0 // 2, ns0 * 2):
            row(f"engine call, {ns} splits", lambda lat, ns=ns: engine(lat, ns))
            got = mla.mla_decode(q_abs, q_pe, lats[0], seq, scale, v_b=v_b, o=o.clone(), num_splits=ns)
            assert torch.allclose(got.float(), ref.float(), atol=2e-2, rtol=2e-2), (ns, (got - ref).abs().max())
        for br in (32, 128):
            row(f"engine call, combine_BR {br}", lambda lat, br=br: engine(lat, None, br))
        ws = mla._workspace(q_abs.device, ns0, H, R)
        row("split kernel alone", lambda lat: mla_gluon.mla_split_gluon(q_abs, q_pe, lat, seq, ws, scale * mla._LOG2E,
                                                                        ns0, 64, 128))
        common = dict(BS=64, NS=ns0, MIN_CHUNK=128, LEN_IN_PTR=True)
        row("combine_vo alone", lambda lat: mla._combine_vo(*ws, seq, 0, None, v_b, o, o8, None, ns0, common), False)
        ctx = torch.empty(H, R, device="cuda")
        row("combine alone (no v_b)", lambda lat: mla.mla_decode_combine_kernel[(H, R // 128)](
            *ws, seq, 0, ctx, H=H, R=R, BR=128, BN=mla._combine_bn(ns0), BNS=triton.next_power_of_2(ns0),
            num_warps=4, PDL=False, **common), False)
        lats = None  # free the copies before the next size
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
