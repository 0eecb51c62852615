"""Programmatic dependent launch (PDL, sm_90+) for the decode step's kernels.

A decode step is ~350 small kernels in a row. Without PDL, kernel N+1's programs are only scheduled once
the last program of kernel N has exited, so every kernel pays its launch, ramp-up and drain in series
(~1-2 us each at these sizes). With PDL (Triton's `launch_pdl=True`), kernel N+1 is launched as soon as
every program of kernel N has called `gdc_launch_dependents()`; its programs then run their prologue
(index math, reads of weights, which no kernel writes) and block in `gdc_wait()` until kernel N has
completed and its writes are visible.

Rule for every kernel launched with PDL: call `gdc_wait()` before reading anything another kernel writes
and before writing anything, and call `gdc_launch_dependents()` only after `gdc_wait()`. Then kernel N+1
can only start once kernel N-1 has completed, so the chain stays ordered transitively, also through
kernels launched without PDL (they wait for full completion, as always).

`enabled()` is read by the launchers at launch time; the engine turns it on around the decode step
(eager warm-up and CUDA-graph capture; a captured graph keeps the programmatic edges). The environment
variable KIMI_LOCAL_PDL=0 turns it off (A/B measurements); KIMI_LOCAL_PREFETCH=1 adds the L2 prefetch of
weights before the wait (below; off by default).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    AVAILABLE = True
except ImportError:  # older Triton: enabled() stays False, these stubs are never traced with PDL=True
    AVAILABLE = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


_INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ON = False


def supported(device) -> bool:
    """PDL can be used on this device: Triton has it, not interpreting, CUDA capability >= 9.0, and
    KIMI_LOCAL_PDL is not "0"."""
    if not AVAILABLE or _INTERP or os.environ.get("KIMI_LOCAL_PDL", "1") == "0":
        return False
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9


def enabled() -> bool:
    return _ON


def prefetch() -> bool:
    """Kernels prefetch their weights into L2 before the PDL wait: only with PDL and KIMI_LOCAL_PREFETCH=1.
    Off by default: the full decode step measured 6 % slower with it at 4K context (H200, session 3)."""
    return _ON and os.environ.get("KIMI_LOCAL_PREFETCH", "0") == "1"


PREFETCH_SITES = ("kda", "mla", "router", "moe", "proj")


def prefetch_next(site: str) -> bool:
    """Whether the decode kernel at `site` prefetches the NEXT kernel's weights into L2 (prefetch_share below):
    "kda" (KDA step -> o-projection), "mla" (MLA split -> o-projection), "router" (norm + router -> the shared
    expert's gate/up), "moe" (MoE gate/up -> the selected experts' down matrices), "proj" (MoE down -> the next
    layer's first projection). With PDL only (the decode
    step on sm_90+). KIMI_LOCAL_PREFETCH_NEXT: "1" all sites, "0" none, or a comma list of sites. Default:
    none (all four together measured 5.6 % slower at 4K, H200, session 5: docs/perf-notes.md)."""
    v = os.environ.get("KIMI_LOCAL_PREFETCH_NEXT", "0")
    return _ON and (v == "1" or site in v.split(","))


def prefetch_nt(num_warps: int) -> int:
    """prefetch_share's NT for a kernel of num_warps warps: one request per thread (KIMI_LOCAL_PREFETCH_REQ=
    thread, the default), or one large request per program (=cta: NT = 1)."""
    return 1 if os.environ.get("KIMI_LOCAL_PREFETCH_REQ", "thread") == "cta" else 32 * num_warps


def launch_kw() -> dict:
    """Extra launch arguments for a PDL-aware kernel: {"launch_pdl": True} while enabled."""
    return {"launch_pdl": True} if _ON else {}


@contextlib.contextmanager
def active(on: bool = True):
    """Launch the PDL-aware kernels with PDL inside this block (when `on`)."""
    global _ON
    prev, _ON = _ON, bool(on) and AVAILABLE and not _INTERP
    try:
        yield
    finally:
        _ON = prev


# ----------------------------------------------------------------------------------------------
# L2 prefetch of weights before the wait: a kernel's programs that are resident while the previous
# kernel still runs start pulling their (constant) weight bytes from HBM into L2, so the weight stream of
# consecutive small GEMVs overlaps their launch and the previous kernel's tail. sm_90 only (bulk async).


@triton.jit
def prefetch_l2_bulk(ptr, nbytes):
    """Prefetch [ptr, ptr + nbytes) into L2 for every element of the pointer tensor `ptr` (one bulk
    request each; ptr 16-byte aligned, nbytes a multiple of 16: `cp.async.bulk.prefetch.L2`)."""
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                              [ptr, nbytes], dtype=tl.int32, is_pure=False, pack=1)



@triton.jit
def prefetch_share(base, nbytes, pid, nprog, NT: tl.constexpr):
    """Program pid of nprog prefetches its share of the bytes [base, base + nbytes) into L2: NT requests (one
    per thread: NT = 32 * num_warps; NT = 1: one request by thread 0), a contiguous slice each, so the whole
    range is spread over every SM's copy engine. nbytes a multiple of 16, base 16-byte aligned. Returns nothing
    the caller must wait for."""
    base = base.to(tl.pointer_type(tl.uint8))  # byte offsets whatever the tensor's dtype
    nb = nbytes.to(tl.int64)
    per_thr = tl.cdiv(tl.cdiv(nb, nprog * NT), 16) * 16  # bytes per request, a multiple of 16
    off = (pid * NT + tl.arange(0, NT)).to(tl.int64) * per_thr
    n = tl.minimum(per_thr, nb - off).to(tl.int32)  # <= 0: nothing left for this thread (predicated off)
    if NT == 1:  # the [1] tensor is replicated in every thread: only thread 0 issues it
        tl.inline_asm_elementwise(
            "{\n\t.reg .pred p, q;\n\t.reg .u32 t;\n\tmov.u32 t, %tid.x;\n\tsetp.gt.s32 p, $2, 0;\n\t"
            "setp.eq.and.u32 q, t, 0, p;\n\t@q cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;\n\t}",
            "=r,l,r", [base + off, n], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(
            "{\n\t.reg .pred p;\n\tsetp.gt.s32 p, $2, 0;\n\t@p cp.async.bulk.prefetch.L2.global [$1], $2;\n\t"
            "mov.u32 $0, 0;\n\t}", "=r,l,r", [base + off, n], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_bytes(t) -> int:
    """The prefetchable byte count of a weight tensor (a multiple of 16; 0 = nothing)."""
    return 0 if t is None else (t.numel() * t.element_size()) // 16 * 16
