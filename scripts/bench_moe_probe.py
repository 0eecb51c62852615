"""Where does the Gluon MoE gate/up's time go? Its routed CTAs re-built from kernels/moe_gluon.py's own pieces, with
parts of their work removed, timed side by side with the real kernel.

Q4_K experts [1024, 2304] (gate and up), 8 picks of 64 experts given as slot ids (no routing, no shared expert,
no PDL): 512 CTAs of 2 warps, a 4-stage ring of 2 KB, as session 19's gate/up ran its routed CTAs. Modes:

  0  full   the ring, the side words a stage ahead, the x words and the dp4a dot (moe_gluon._stage_dot)
  1  ring   the ring alone: each thread adds up the words it copied
  2  side   the ring and the side-word loads, no x, no dot
  3  dot    the ring, the x words and the dot, the side words replaced by constants (no side loads)
  4  unrolled  mode 0 with the stage loop unrolled (ptxas may then hoist the x loads of many stages)

and modes 0 and 4 with 1 warp a CTA (4 rows a thread: each x load serves twice the weights).

Each mode writes its rows' sums of both matrices; mode 0's are checked against torch on the dequantized weights.
Graph of 8 calls over other picks each (8 x 21 MB, more than the 50 MB L2), median per call. The real gate/up
kernel (moe_gluon.gate_up, same picks, no shared expert) is timed in the same run.

    python3 scripts/bench_moe_probe.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_kernels import rand_packed  # noqa: E402
from kimi_local.bench import hbm_bandwidth  # noqa: E402
from sweep_gemv import graph_time  # noqa: E402
from kimi_local.kernels import moe_gluon as M, quant_matmul as qm  # noqa: E402
from kimi_local.kernels.gluon_compat import HAVE_GLUON, cp, gl, gluon  # noqa: E402

S, D, F, K = 64, 2304, 1024, 8
MODES = ("full", "ring", "side", "dot", "unrolled")

if HAVE_GLUON:

    @gluon.jit
    def probe_kernel(x8, slot_ids, gate, up, out, mat_g, mat_u, F: gl.constexpr, D: gl.constexpr, NS: gl.constexpr,
                     W: gl.constexpr, MODE: gl.constexpr):
        """CTA q: pick q // (F / 16), rows f0 = (q % (F / 16)) * 16 of gate and up; out[q * 16 + r] = the rows' dots
        (modes 0, 3) or sums of what was read (1, 2)."""
        QT: gl.constexpr = 1  # Q4_K
        L3: gl.constexpr = gl.BlockedLayout([16 // (4 * W), 1, 4], [4, 8, 1], [W, 1, 1], [2, 1, 0])
        L2: gl.constexpr = gl.SliceLayout(2, L3)
        NT: gl.constexpr = F // 16
        SPM: gl.constexpr = D // 256
        T: gl.constexpr = 2 * SPM
        q = gl.program_id(0)
        f0 = (q % NT) * 16
        slot = gl.load(slot_ids + q // NT).to(gl.int64)
        wa = gate + slot * mat_g
        wb = up + slot * mat_u
        qr = gl.allocate_shared_memory(gl.int32, [NS, 16, 8, 4], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
        dxp = (x8 + D // 4).to(gl.pointer_type(gl.float32))
        M._prologue(qr, qr, qr, qr, wa, wb, 2, f0, F, D, QT, NS, False, 0 if MODE == 1 else 1, L3, W)
        acc = gl.zeros([16, 8], gl.float32, layout=L2)
        if MODE == 4:
            s0, s1, s2, h = M._side_stage(0, wa, wb, f0, F, D, QT, L3)
            for t in gl.static_range(T):
                M._issue_stage(qr, qr, qr, qr, t + NS - 1, wa, wb, 2, f0, F, D, QT, NS, False, L3)
                n0, n1, n2, nh = M._side_stage(min(t + 1, T - 1), wa, wb, f0, F, D, QT, L3)
                cp.wait_group(NS - 1)
                acc += M._stage_dot(qr, t % NS, t % SPM, x8, dxp, dxp + D // 16, s0, s1, s2, h, QT, L3)
                s0, s1, s2, h = n0, n1, n2, nh
        elif MODE == 1:
            for t in range(T):
                M._issue_stage(qr, qr, qr, qr, t + NS - 1, wa, wb, 2, f0, F, D, QT, NS, False, L3)
                cp.wait_group(NS - 1)
                acc += gl.sum(qr.index(t % NS).load(L3), axis=2).to(gl.float32)
        elif MODE == 0 or MODE == 2:  # the side words a stage ahead; 0: the dot, 2: only add up what was read
            s0, s1, s2, h = M._side_stage(0, wa, wb, f0, F, D, QT, L3)
            for t in range(T):
                M._issue_stage(qr, qr, qr, qr, t + NS - 1, wa, wb, 2, f0, F, D, QT, NS, False, L3)
                n0, n1, n2, nh = M._side_stage(gl.minimum(t + 1, T - 1), wa, wb, f0, F, D, QT, L3)
                cp.wait_group(NS - 1)
                if MODE == 0:
                    acc += M._stage_dot(qr, t % NS, t % SPM, x8, dxp, dxp + D // 16, s0, s1, s2, h, QT, L3)
                else:
                    acc += (gl.sum(qr.index(t % NS).load(L3), axis=2) + s0 + s1 + s2).to(gl.float32)
                s0, s1, s2, h = n0, n1, n2, nh
        else:
            one = gl.full([16, 8], 0x3C003C00, gl.int32, layout=L2)  # fp16 1.0 in both halves
            hz = gl.zeros([16, 8, 4], gl.int32, layout=L3)
            for t in range(T):
                M._issue_stage(qr, qr, qr, qr, t + NS - 1, wa, wb, 2, f0, F, D, QT, NS, False, L3)
                cp.wait_group(NS - 1)
                acc += M._stage_dot(qr, t % NS, t % SPM, x8, dxp, dxp + D // 16, one, one, one, hz, QT, L3)
        cp.wait_group(0)
        o = gl.arange(0, 16, layout=gl.SliceLayout(1, L2))
        gl.store(out + q * 16 + o, gl.sum(acc, axis=1))


def main():
    if not HAVE_GLUON or torch.cuda.get_device_capability()[0] != 9:
        sys.exit("needs Gluon and a Hopper GPU")
    gate, up = (rand_packed("Q4_K", (S,), F, D) for _ in range(2))
    nbytes = K * (gate[0].numel() + up[0].numel())
    x = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    x8 = qm.quantize_x8(x)
    gen = torch.Generator().manual_seed(0)
    sels = [torch.randperm(S, generator=gen)[:K].to(torch.int32).cuda() for _ in range(8)]
    out = torch.empty(K * F, device="cuda")
    act = torch.empty(K + 1, qm.x8_words(F), dtype=torch.int32, device="cuda")
    rows = []

    def probe(sel, mode, w=M.DEFAULT_W):
        probe_kernel[(K * F // 16,)](x8, sel, gate, up, out, gate[0].numel(), up[0].numel(), F=F, D=D,
                                     NS=4, W=w, MODE=mode, num_warps=w)  # session 19's ring

    xd = qm.dequantize_x8(x8, D).float()
    want = torch.cat([(qm.dequantize_gpu(gate[s], "Q4_K", (F, D)).float() + qm.dequantize_gpu(up[s], "Q4_K", (F, D))
                       .float()) @ xd for s in sels[0].tolist()])
    err = 0.0
    for mode, w in ((0, 2), (4, 2), (0, 1), (4, 1)):  # the dot modes against torch: gate + up rows times x8
        out.fill_(float("nan"))
        probe(sels[0], mode, w)
        e = ((out - want).norm() / want.norm()).item()
        print(f"mode {mode}, {w} warps, against torch: relative error {e:.2e}", flush=True)
        err = max(err, e) if e == e else float("inf")
    for mode, name in enumerate(MODES):
        us = graph_time([lambda s=s, m=mode: probe(s, m) for s in sels], False) * 1e3
        rows.append((f"probe {name}", us))
    for mode in (0, 4):
        us = graph_time([lambda s=s, m=mode: probe(s, m, 1) for s in sels], False) * 1e3
        rows.append((f"probe {MODES[mode]}, 1 warp", us))
    us = graph_time([lambda s=s: M.gate_up(x8, s, s, gate, up, None, act, D, "Q4_K", None, K, False, False)
                     for s in sels], False) * 1e3
    rows.append(("moe_gluon.gate_up (routed only)", us))
    copy = hbm_bandwidth("cuda") / 1e9  # GB/s (runs 9-10 timed a 128 MiB graph-replayed copy: 3,862-3,875)
    print(f"copy {copy:.0f} GB/s; bytes per call {nbytes / 1e6:.1f} MB, floor {nbytes / copy * 1e-3:.2f} us")
    print("| kernel | us per call | GB/s | % of copy |\n|---|---|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.2f} | {nbytes / us * 1e-3:.0f} | {100 * nbytes / us * 1e-3 / copy:.1f} |")
    if err > 2e-2:
        sys.exit("a dot mode does not match torch")


if __name__ == "__main__":
    main()
