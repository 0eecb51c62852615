"""Compile every Gluon kernel (kernels/moe_gluon.py, moe_prefill_gluon.py, mla_gluon.py) for sm_90 here, no GPU needed.

Prints, per kernel configuration, the shared memory, and the registers and local memory (spills) of the sm_90 cubin
(Triton's bundled cuobjdump); `--json` prints the same as JSON (tests/test_gluon_compile.py reads it). Exit status 1 if any
configuration fails to compile. Run it without TRITON_INTERPRET (the interpreter replaces the jit functions that
Gluon's reductions call). Use it before sending Gluon changes to a GPU: it catches compile errors and shows the
resource use that decides residency (moe_gluon's module doc).

    python scripts/gluon_compile.py [--json] [--only moe,prefill,mla] [--sass]

--sass adds, per configuration, the number of SASS instructions and a hash of them (addresses and line info left
out): a refactor that leaves every hash unchanged leaves the GPU code unchanged, which needs no device run to verify
(session 19: kernels/gluon_compat.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cases(only: set):
    """(name, kernel, argument types, constexprs, num_warps[, maxnreg]) of every configuration the engine launches by
    default, plus the A/B variants that a device run may switch on."""
    from kernels import mla_gluon, moe_gluon as M, moe_prefill_gluon as P
    out = []
    if "moe" in only:
        for qt, qts, route, ss in (("Q4_K", "Q8_0", True, False), ("Q4_K", "Q8_0", False, False),
                                   ("Q4_K", "Q8_0", True, True), ("Q4_K", "Q4_K", True, False),
                                   ("Q8_0", "Q8_0", False, False)):
            ab = (qt, qts, route, ss) == ("Q4_K", "Q8_0", True, False)  # this one also in its A/B variants:
            # KIMI_LOCAL_MOE_GLUON_UNROLL=0 (rolled), KIMI_LOCAL_MOE_GLUON_PAIR=0 (unrolled, unpaired)
            for unroll in (M.DEFAULT_UNROLL, 0, "unpaired") if ab else (M.DEFAULT_UNROLL,):
                types = {"x8": "*i32", "slot_ids": "*fp32" if route else "*i32", "rbias": "*fp32" if route else "*i32",
                         "gate": "*u8", "up": "*u8", "sgate": "*u8", "sup": "*u8", "act": "*i32", "mat_g": "i64",
                         "mat_u": "i64"}
                ce = dict(F=1024, D=2304, KTOP=8, QT=M.QT_ID[qt], QTS=M.QT_ID[qts], HAS_SHARED=True, ROUTE=route,
                          NR=256 if route else 32, NS=M.SS_NS if ss else M.DEFAULT_NS, PDL=True, SS=ss,
                          PF=0 if ss else M.DEFAULT_PF, SPF=0 if ss else M.DEFAULT_SPF, W=M.DEFAULT_W,
                          UNROLL=0 if ss else M.DEFAULT_UNROLL if unroll == "unpaired" else unroll,
                          PAIR=bool(M.DEFAULT_PAIR) and not ss and unroll == M.DEFAULT_UNROLL)
                name = f"moe_gate_up {qt}+{qts} route={int(route)} ss={int(ss)}"
                out.append((name + {M.DEFAULT_UNROLL: "", 0: " unroll=0", "unpaired": " pair=0"}[unroll],
                            M.moe_gate_up_gluon_kernel, types, ce, M.DEFAULT_W))
        for qd, qsd, route, ns, norm in (("Q5_K", "Q8_0", True, M.DOWN_NS, True),
                                         ("Q5_K", "Q8_0", True, M.DOWN_NS, False), ("Q5_K", "Q8_0", False, 3, False),
                                         ("Q4_K", "Q4_K", True, M.DOWN_NS, True), ("Q8_0", None, False, M.DOWN_NS, False)):
            types = {"act": "*i32", "slot_ids": "*fp32" if route else "*i32", "weights": "*fp32",
                     "rbias": "*fp32" if route else "*i32", "down": "*u8", "sdown": "*u8", "out": "*bf16",
                     "part": "*fp32", "cnt": "*i32", "mat_d": "i64", "rscale": "fp32", "res": "*bf16",
                     "nw": "*fp32", "x8n": "*i32"}
            ce = dict(D=2304, F=1024, KTOP=8, QT=M.QT_ID[qd], QTS=M.QT_ID[qsd or qd], HAS_SHARED=qsd is not None,
                      ROUTE=route, NR=256 if route else 32, BIASED=False, RENORM=True, NS=ns, PDL=True, PF=1,
                      W=M.DOWN_W, NORM=norm, UNROLL=M.DOWN_UNROLL, FS=1)
            out.append((f"moe_down {qd}+{qsd} route={int(route)} ns={ns} norm={int(norm)}", M.moe_down_gluon_kernel,
                        types, ce, M.DOWN_W))
            if (qd, qsd, route, norm) == ("Q5_K", "Q8_0", True, True):  # the dense layer 0's down (moe.dense_slices)
                for qs in ("Q8_0", "Q4_K"):
                    out.append((f"moe_down dense {qs} F=9216 fs=9 ns={ns} norm=1", M.moe_down_gluon_kernel, types,
                                dict(ce, KTOP=0, QT=M.QT_ID[qs], QTS=M.QT_ID[qs], ROUTE=False, NR=32, FS=9),
                                M.DOWN_W))
            if (qd, qsd, route, norm) == ("Q5_K", "Q8_0", True, False):  # A/B: _DOWN_UNROLL=0, _DOWN_W=2
                out.append((out[-1][0] + " unroll=0", M.moe_down_gluon_kernel, types, dict(ce, UNROLL=0),
                            M.DOWN_W))
                out.append((out[-2][0] + " w=2", M.moe_down_gluon_kernel, types, dict(ce, W=2), 2))
    if "prefill" in only:
        for which, bm, qt in (("gate_up", 16, "Q4_K"), ("gate_up", 64, "Q4_K"), ("gate_up", 128, "Q4_K"),
                              ("gate_up", 256, "Q4_K"), ("gate_up", 256, "Q5_K"), ("down", 16, "Q4_K"),
                              ("down", 128, "Q4_K"), ("down", 16, "Q5_K"), ("down", 128, "Q5_K")):
            lp, lqc, lvc, lxc, le = P.layouts(bm)
            ce = dict(F=1024, D=2304, BM=bm, NS=P._ns(0, bm, down=which == "down"), Q5=qt == "Q5_K", LP=lp, LQC=lqc,
                      LVC=lvc, LXC=lxc, WAIT=1)
            if which == "gate_up":
                types = {"x": "*bf16", "stride_xt": "i32", "tok": "*i32", "tile_slot": "*i32", "tile_row0": "*i32",
                         "tile_row1": "*i32", "gate": "*u8", "up": "*u8", "h": "*bf16", "mat_g": "i64", "S": "i32"}
                ce["LE"] = le
                fn = P.moe_gate_up_prefill_kernel
            else:
                types = {"hin": "*bf16", "asg": "*i32", "topk_w": "*fp32", "tile_slot": "*i32", "tile_row0": "*i32",
                         "tile_row1": "*i32", "down": "*u8", "y": "*fp32", "mat_d": "i64", "S": "i32"}
                fn = P.moe_down_prefill_kernel
            out.append((f"moe_prefill_{which} {qt} BM={bm}", fn, types, ce, 8,
                        P.down_maxnreg(bm) if which == "down" else 0))
    if "mla" in only:
        gl = mla_gluon.gl
        for fp8, pdl in ((False, False), (True, False), (False, True)):
            types = {"q_abs": "*bf16", "q_pe": "*bf16", "lat": "*fp8e4nv" if fp8 else "*bf16", "lat_scale": "*fp32",
                     "seq_ptr": "*i32", "ws_m": "*fp32", "ws_l": "*fp32", "ws_acc": "*fp32", "qk_scale": "fp32",
                     "stride_lat": "i32", "stride_qp": "i32"}
            lc, lk, ring = mla_gluon.split_layouts(fp8, 64)
            ce = dict(H=32, R=512, DR=64, BH=32, BS=64, NS=128, MIN_CHUNK=256, FP8=fp8,
                      RING_DT=gl.float8e4nv if fp8 else gl.bfloat16, LC=lc, LK=lk, RING_L=ring, PDL=pdl)
            out.append((f"mla_split {'fp8' if fp8 else 'bf16'}" + (" pdl" if pdl else ""),
                        mla_gluon.mla_split_gluon_kernel, types, ce, 4))
    return out


def _sass_digest(cuobjdump: Path, cubin: Path) -> tuple[str, int]:
    """(sha256 prefix, count) of the cubin's SASS instructions, without their addresses and line info."""
    sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True).stdout
    addr = re.compile(r"/\*[0-9a-f]{4,}\*/")  # an instruction's address (past 0xffff: 5+ hex digits)
    ins = [addr.sub("", ln).strip() for ln in sass.splitlines() if addr.search(ln)]
    return hashlib.sha256("\n".join(ins).encode()).hexdigest()[:16], len(ins)


def compile_one(fn, types: dict, constexprs: dict, num_warps: int, maxnreg: int = 0, sass: bool = False) -> dict:
    """triton.compile for sm_90 (pointer and integer arguments marked 16-divisible, as Triton's launcher specialises
    them for these sizes), then cuobjdump -res-usage on the cubin: {shared, regs, local_bytes}; sass: also
    {sass_hash, sass_instructions} (_sass_digest)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    sig = dict(types)
    sig.update({k: "constexpr" for k in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(types.values()) if t[0] in "*i"}
    src = GluonASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    opts = {"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}  # maxnreg: the launch's register cap
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    res = {"shared": int(c.metadata.shared), "regs": None, "local_bytes": None}
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cuobjdump.exists() and c.asm.get("cubin"):
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "k.cubin"
            p.write_bytes(c.asm["cubin"])
            usage = subprocess.run([str(cuobjdump), "-res-usage", str(p)], capture_output=True, text=True).stdout
            if sass:
                res["sass_hash"], res["sass_instructions"] = _sass_digest(cuobjdump, p)
        m = re.search(r"REG:(\d+) .*LOCAL:(\d+)", usage)
        if m:  # LOCAL > 0: register spills (or a local array)
            res["regs"], res["local_bytes"] = int(m.group(1)), int(m.group(2))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--only", default="moe,prefill,mla", help="comma list of: moe, prefill, mla")
    ap.add_argument("--sass", action="store_true", help="also a hash and count of each kernel's SASS instructions")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter's jit functions cannot be compiled", file=sys.stderr)
        return 2
    from kernels import moe_gluon
    if not moe_gluon.HAVE_GLUON:
        print("this Triton has no Gluon", file=sys.stderr)
        return 2
    results, failed = {}, 0
    for name, fn, types, ce, warps, *cap in cases(set(args.only.split(","))):
        try:
            results[name] = compile_one(fn, types, ce, warps, *(cap or [0]), sass=args.sass)
        except Exception as e:  # keep going: report every configuration
            results[name] = {"error": f"{type(e).__name__}: {str(e)[-600:]}"}
            failed += 1
    if args.json:
        print(json.dumps(results))
    else:
        for name, r in results.items():
            print(f"{name:40s} " + (r["error"] if "error" in r else
                                    f"shared {r['shared']:6d} B  regs {r['regs']}  local {r['local_bytes']} B"
                                    + (f"  sass {r['sass_instructions']} {r['sass_hash']}" if "sass_hash" in r
                                       else "")))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
