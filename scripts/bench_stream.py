"""How fast can ONE graph-replayed kernel stream the bytes of one decode MoE half? (the floor under kernels/moe.py)

The fused MoE decode reads ~27 MB (gate/up: 8 routed experts + the shared one, two [1024, 2304] matrices each at
Q4_K / Q8_0) and ~16 MB (down) per layer, and measured 36 % of HBM bandwidth (session 10). This script times
kernels that only read the same bytes in the same units (16-row tiles of expert matrices, whole rows
contiguous) and add them up, so the number is what the access pattern alone allows:

  direct   Triton, the MoE gate/up grid (16-row tiles x experts x K splits, 1 warp): loads straight into
           registers, C 16-byte chunks per row and step (what the word-path kernels do, minus the arithmetic);
  flat     Triton, P programs x W warps, each streaming its share of the tiles in [SR, 128]-word steps of
           plain loads (no pipelining: one step's loads in flight per warp);
  ring     Gluon (sm_90), the same split with an NS-stage cp.async ring in shared memory: each thread copies
           16-byte pieces and later reads back exactly the pieces it copied (no barriers, no layout change),
           so a CTA keeps up to NS steps in flight independent of its registers.

Weights rotate over 4 copies (> the 50 MB L2), one CUDA graph of 8 calls, median per call. Every row checks the
kernel's sum against torch's. Known (H200, session 11, runs 3 and 9): "ring rows" with CH=8 NS=8, CH=16 NS=4 and
CH=32 NS=4 fail that check, with or without a barrier before a ring slot is reused; the cause is not found, so those
rows' times are not to be trusted. The MoE kernel itself passes its GPU tests with 3, 4, 6 and 8 stages.

    python3 scripts/bench_stream.py [--only direct,flat,ring,rows,sizes]

`--only sizes` times the best ring over 5, 9 and 14 experts' matrix pairs and the 9 + 5 as two launches: what a
kernel boundary costs (H200, session 18: 14 experts in one launch 13.86 us, as two launches 16.01 us).
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

try:
    from kimi_local.kernels.gluon_compat import HAVE_GLUON, _async_load, _barrier, cp, gl, gluon
except ImportError:  # not pip-installed: the source dir
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels.gluon_compat import HAVE_GLUON, _async_load, _barrier, cp, gl, gluon

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_gemv import graph_time  # noqa: E402

RW = 384  # int32 words per matrix row (1,536 B; a Q4_K row of 2304 is 1,332 B packed)
F = 1024  # rows per expert matrix
E = 9  # 8 routed + shared
TILE = 16  # rows per tile: a tile is 16 * RW = 6,144 contiguous words (24 KB)


@triton.jit
def direct_kernel(pool, slots, out, S1: tl.constexpr, C: tl.constexpr, RW: tl.constexpr, F: tl.constexpr,
                  TILE: tl.constexpr):
    """grid (F / TILE, E, S1), 1 warp: rows of gate and up of expert e, words [s * RW/S1, (s+1) * RW/S1)."""
    i_f, i_e, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slots + i_e).to(tl.int64)
    n = i_f * TILE + tl.arange(0, TILE)
    ii = tl.arange(0, 4)
    acc = tl.zeros([TILE, C, 4], tl.int32)
    WPS: tl.constexpr = RW // S1
    for m in tl.static_range(2):
        base = pool + (m * 64 + slot) * F * RW  # [2, 64, F, RW]
        for c0 in range(i_s * WPS // 4, (i_s + 1) * WPS // 4, C):
            cg = c0 + tl.arange(0, C)
            acc += tl.load(base + ((n[:, None] * (RW // 4) + cg[None, :]) * 4)[:, :, None] + ii[None, None, :])
    tl.store(out + (i_e * S1 + i_s) * tl.num_programs(0) + i_f, tl.sum(tl.sum(tl.sum(acc, 2), 1), 0))


@triton.jit
def flat_kernel(pool, slots, out, TPC, SR: tl.constexpr, RW: tl.constexpr, F: tl.constexpr, TILE: tl.constexpr):
    """grid (P,): program p streams tiles [p * TPC, (p+1) * TPC) of the 2 * E * F / TILE tiles in [SR, 128] steps."""
    p = tl.program_id(0)
    NT: tl.constexpr = F // TILE
    SPT: tl.constexpr = TILE * RW // (SR * 128)  # steps per tile
    r = tl.arange(0, SR)
    c = tl.arange(0, 128)
    acc = tl.zeros([SR, 128], tl.int32)
    for j in range(p * TPC * SPT, (p + 1) * TPC * SPT):
        t = j // SPT
        m = t // (E_ * NT)
        e = (t // NT) % E_
        slot = tl.load(slots + e).to(tl.int64)
        base = pool + ((m * 64 + slot) * F + (t % NT) * TILE) * RW + (j % SPT) * SR * 128
        acc += tl.load(base + r[:, None] * 128 + c[None, :])
    tl.store(out + p, tl.sum(tl.sum(acc, 1), 0))


E_ = tl.constexpr(E)

if HAVE_GLUON:

    @gluon.jit
    def _issue(ring, pool, slots, j, TPC, p, SR: gl.constexpr, RW: gl.constexpr, F: gl.constexpr,
               TILE: gl.constexpr, NS: gl.constexpr, L: gl.constexpr, NE: gl.constexpr):
        NT: gl.constexpr = F // TILE
        SPT: gl.constexpr = TILE * RW // (SR * 128)
        jj = p * TPC * SPT + j
        t = jj // SPT
        m = t // (NE * NT)
        e = (t // NT) % NE
        slot = gl.load(slots + e).to(gl.int64)
        base = pool + ((m * 64 + slot) * F + (t % NT) * TILE) * RW + (jj % SPT) * SR * 128
        r = gl.arange(0, SR, layout=gl.SliceLayout(1, L))
        c = gl.arange(0, 128, layout=gl.SliceLayout(0, L))
        _async_load(ring.index(j % NS), base + r[:, None] * 128 + c[None, :])

    @gluon.jit
    def ring_kernel(pool, slots, out, TPC, SR: gl.constexpr, RW: gl.constexpr, F: gl.constexpr,
                    TILE: gl.constexpr, NS: gl.constexpr, W: gl.constexpr, NE: gl.constexpr):
        L: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [W, 1], [1, 0])
        SL: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        p = gl.program_id(0)
        SPT: gl.constexpr = TILE * RW // (SR * 128)
        n = TPC * SPT
        ring = gl.allocate_shared_memory(gl.int32, [NS, SR, 128], SL)
        for j in gl.static_range(NS - 1):
            if j < n:
                _issue(ring, pool, slots, j, TPC, p, SR, RW, F, TILE, NS, L, NE)
            cp.commit_group()
        acc = gl.zeros([SR, 128], gl.int32, layout=L)
        for j in range(n):
            _barrier()  # every warp has read the slot the next copies overwrite
            if j + NS - 1 < n:
                _issue(ring, pool, slots, j + NS - 1, TPC, p, SR, RW, F, TILE, NS, L, NE)
            cp.commit_group()
            cp.wait_group(NS - 1)
            acc += ring.index(j % NS).load(L)
        cp.wait_group(0)
        gl.store(out + p, gl.sum(gl.sum(acc, 1), 0))


if HAVE_GLUON:

    @gluon.jit
    def _issue_rows(ring, pool, slot, m, f0, t, CH: gl.constexpr, RW: gl.constexpr, F: gl.constexpr,
                    NS: gl.constexpr, L3: gl.constexpr):
        """Stage t of matrix m: chunks t * CH .. + CH of rows f0 .. f0 + 15 (as the Gluon MoE gate/up reads)."""
        L2: gl.constexpr = gl.SliceLayout(2, L3)
        r = gl.expand_dims(gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(1, L2)), 1), 2)
        c = gl.expand_dims(gl.expand_dims(gl.arange(0, CH, layout=gl.SliceLayout(0, L2)), 0), 2)
        ii = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3))), 0), 1)
        base = pool + ((m * 64 + slot) * F + f0) * RW
        _async_load(ring.index(t % NS), base + r * RW + (t * CH + c) * 4 + ii)

    @gluon.jit
    def ring_rows_kernel(pool, slots, out, CH: gl.constexpr, RW: gl.constexpr, F: gl.constexpr, NS: gl.constexpr):
        """CTA (16-row tile, expert e), 4 warps: gate then up rows, CH 16-byte chunks of every row per stage."""
        L3: gl.constexpr = gl.BlockedLayout([1, CH // 8, 4], [4, 8, 1], [4, 1, 1], [2, 1, 0])
        SL: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
        NT: gl.constexpr = F // 16
        SPM: gl.constexpr = RW // (4 * CH)  # stages per matrix
        pid = gl.program_id(0)
        e = pid // NT
        f0 = (pid % NT) * 16
        slot = gl.load(slots + e).to(gl.int64)
        ring = gl.allocate_shared_memory(gl.int32, [NS, 16, CH, 4], SL)
        for t in gl.static_range(NS - 1):
            _issue_rows(ring, pool, slot, t // SPM, f0, t % SPM, CH, RW, F, NS, L3)
            cp.commit_group()
        acc = gl.zeros([16, CH, 4], gl.int32, layout=L3)
        for t in range(2 * SPM):
            _barrier()  # every warp has read the slot the next copies overwrite
            tn = t + NS - 1
            if tn < 2 * SPM:
                _issue_rows(ring, pool, slot, tn // SPM, f0, tn % SPM, CH, RW, F, NS, L3)
            cp.commit_group()
            cp.wait_group(NS - 1)
            acc += ring.index(t % NS).load(L3)
        cp.wait_group(0)
        gl.store(out + pid, gl.sum(gl.sum(gl.sum(acc, 2), 1), 0))


def size_rows(pools, out, bw):
    """The ring kernel at the gate/up half's best configuration (64 CTAs x 4 warps per expert, 4 KB stages x 4)
    over 5, 9 and 14 experts' matrix pairs (15.7, 28.3 and 44.0 MB: about the down half, the gate/up half and both),
    and the 9- and 5-expert launches back to back in one call: what one kernel boundary costs a stream of these
    bytes (the question behind fusing the MoE decode's two halves into one launch)."""
    NT, gen, rows = F // TILE, torch.Generator().manual_seed(1), []

    def ring(pool, sl, ne, o):
        ring_kernel[(64 * ne,)](pool, sl, o, 2 * NT // 64, SR=8, RW=RW, F=F, TILE=TILE, NS=4, W=4, NE=ne, num_warps=4)

    sls = {ne: [torch.randperm(64, generator=gen)[:ne].to(torch.int32).cuda() for _ in range(8)] for ne in (5, 9, 14)}
    cases = [(f"ring {ne} experts", ne, [lambda i=i, ne=ne: ring(pools[i % 4], sls[ne][i % 8], ne, out)
                                         for i in range(8)]) for ne in (5, 9, 14)]
    cases.append(("ring 9 experts, then ring 5 experts (two launches)", 14,
                  [lambda i=i: (ring(pools[i % 4], sls[9][i % 8], 9, out), ring(pools[(i + 1) % 4], sls[5][i % 8], 5,
                                                                                 out[4096:])) for i in range(8)]))
    for name, ne, calls in cases:
        nbytes = 2 * ne * F * RW * 4
        ok = None
        if "then" not in name:  # the int32 sum of what it read, as main's rows check it
            ring(pools[0], sls[ne][0], ne, out)
            got = int(out[:64 * ne].to(torch.int64).sum().item())
            v = int(pools[0][:, sls[ne][0].long()].reshape(-1).to(torch.int64).sum())
            ok = ((got + 2**31) % 2**32) == ((v + 2**31) % 2**32)
        ms = graph_ms(calls)
        r = dict(case=name, us=ms * 1e3, GBs=nbytes / ms / 1e6, pct=100 * nbytes / ms / 1e6 / bw, ok=ok)
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def graph_ms(calls):
    """Median ms per call of the calls replayed as one CUDA graph (sweep_gemv.graph_time)."""
    return graph_time(calls, quick=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="direct,flat,ring,rows", help="comma list of: direct, flat, ring, rows, sizes")
    args = ap.parse_args()
    only = set(args.only.split(","))
    dev = "cuda"
    nbytes = 2 * E * F * RW * 4
    pools = [torch.randint(-2**31, 2**31 - 1, (2, 64, F, RW), dtype=torch.int32, device=dev) for _ in range(4)]
    gen = torch.Generator().manual_seed(0)
    slots = [torch.randperm(64, generator=gen)[:E].to(torch.int32).to(dev) for _ in range(8)]
    out = torch.empty(1 << 16, dtype=torch.int32, device=dev)  # per-program sums (int32 wrap-around)
    x = torch.empty(2 ** 28 // 4, dtype=torch.int32, device=dev)  # 256 MiB: copy its first half from its second
    cp_ms = graph_ms([lambda: x[: x.numel() // 2].copy_(x[x.numel() // 2:])])
    bw = x.numel() * 4 / cp_ms / 1e6
    rows = [dict(case="d2d copy 256 MiB r+w", us=cp_ms * 1e3, GBs=bw)]
    print(f"copy bandwidth {bw:.0f} GB/s; bytes per call {nbytes / 1e6:.1f} MB, floor {nbytes / bw * 1e-3:.2f} us",
          flush=True)

    def want(pool, sl):  # the wrapped int32 sum of what every kernel reads
        v = pool[:, sl.long()].reshape(-1).to(torch.int64).sum()
        return int(((v + 2**31) % 2**32) - 2**31)

    def run(name, launch, nout, check=True):
        calls = [lambda i=i: launch(pools[i % 4], slots[i % 8]) for i in range(8)]
        try:
            launch(pools[0], slots[0])
            torch.cuda.synchronize()
            got = int(out[:nout].to(torch.int64).sum().item())
            got = ((got + 2**31) % 2**32) - 2**31
            ok = got == want(pools[0], slots[0]) if check else None
            ms = graph_ms(calls)
            r = dict(case=name, us=ms * 1e3, GBs=nbytes / ms / 1e6, pct=100 * nbytes / ms / 1e6 / bw, ok=ok)
        except Exception as e:  # a config that does not compile / fit: keep going
            r = dict(case=name, error=f"{type(e).__name__}: {str(e)[:160]}")
        rows.append(r)
        print(json.dumps(r), flush=True)

    NT = F // TILE
    if "sizes" in only and HAVE_GLUON:
        rows += size_rows(pools, out, bw)
    for S1, C, w in ((3, 8, 1), (3, 32, 1), (1, 16, 1), (3, 8, 2), (6, 16, 1)) if "direct" in only else ():
        run(f"direct S1={S1} C={C} warps={w} ({NT * E * S1} programs)",
            lambda p, s, S1=S1, C=C, w=w: direct_kernel[(NT, E, S1)](p, s, out, S1=S1, C=C, RW=RW, F=F, TILE=TILE,
                                                                   num_warps=w), NT * E * S1)
    ntiles = 2 * E * NT
    for P, w, SR in ((144, 4, 8), (288, 4, 8), (576, 4, 4), (1152, 4, 4), (288, 8, 16), (144, 8, 16)) \
            if "flat" in only else ():
        tpc = ntiles // P
        run(f"flat P={P} warps={w} SR={SR}",
            lambda p, s, P=P, w=w, SR=SR, tpc=tpc: flat_kernel[(P,)](p, s, out, tpc, SR=SR, RW=RW, F=F, TILE=TILE,
                                                                   num_warps=w), P)
    if HAVE_GLUON and torch.cuda.get_device_capability()[0] >= 8 and "ring" in only:
        for P, w, SR, NS in ((144, 4, 8, 4), (144, 4, 8, 8), (144, 4, 16, 6), (288, 4, 8, 4), (288, 4, 8, 6),
                             (576, 4, 4, 4), (576, 4, 8, 4), (1152, 4, 4, 4), (144, 8, 16, 4), (288, 8, 8, 6),
                             (144, 4, 4, 12), (72, 8, 16, 8)):
            tpc = ntiles // P
            run(f"ring P={P} warps={w} SR={SR} NS={NS} ({NS * SR * 512 // 1024} KB ring)",
                lambda p, s, P=P, w=w, SR=SR, NS=NS, tpc=tpc: ring_kernel[(P,)](
                    p, s, out, tpc, SR=SR, RW=RW, F=F, TILE=TILE, NS=NS, W=w, NE=E, num_warps=w), P)
    if HAVE_GLUON and torch.cuda.get_device_capability()[0] >= 8 and "rows" in only:
        for CH, NS in ((8, 4), (8, 8), (16, 4), (16, 6), (32, 3), (32, 4)):
            run(f"ring rows CH={CH} NS={NS} (576 CTAs x 16 rows, {16 * CH * 16 * NS // 1024} KB ring)",
                lambda p, s, CH=CH, NS=NS: ring_rows_kernel[(E * NT,)](p, s, out, CH=CH, RW=RW, F=F, NS=NS,
                                                                      num_warps=4), E * NT)
    print("\n| kernel | us | GB/s | % of copy | check |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | error: {r['error']} | | | |")
        else:
            print(f"| {r['case']} | {r['us']:.2f} | {r['GBs']:.0f} | {r.get('pct', 100):.1f} | {r.get('ok', '')} |")


if __name__ == "__main__":
    main()
