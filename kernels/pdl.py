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

from . import carveout

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
if not _INTERP:
    carveout.install()  # every kernel module imports this one: the hook is in place before any kernel loads


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

