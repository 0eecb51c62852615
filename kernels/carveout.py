"""One shared-memory carveout for every kernel of the decode chain (sm_90); also the cluster shape of a kernel.

An SM splits its 256 KB of L1 / shared memory between the two, and changes that split only when it is idle. Left to
the driver, each kernel gets the split that suits its own occupancy: the Triton decode kernels (little shared memory)
run in the 64 KB configuration, a Gluon kernel with a deep copy ring asks for up to 228 KB. Under PDL the next kernel's
CTAs start on an SM while the previous kernel's last CTAs still run there; a kernel that wants another split cannot,
so it loses the overlap at both of its edges (H200, session 11: the first Gluon MoE gate/up lost 515 vs 558 tok/s
end to end although alone it was as fast as the Triton kernel).

Two ways out: size every Gluon kernel to the Triton kernels' 64 KB (what moe_gluon did in session 11: a 3-stage ring),
or pin every kernel to one larger split, so that the Gluon kernels can keep deeper rings. KIMI_LOCAL_CARVEOUT=P
(percent of the maximum shared memory, 228 KB on Hopper; the driver rounds up to a supported size) does the latter:
a Triton load hook sets cuFuncSetAttribute(PREFERRED_SHARED_MEMORY_CARVEOUT, P) on every kernel loaded from then on
(Triton and Gluon, decode and prefill). 0 (the default): the driver's choice, and moe_gluon pins its own kernels.

Measured (H200, session 12, separate processes alternated twice, tok/s at 4K / 128K): the default 580.0 / 506.1;
KIMI_LOCAL_CARVEOUT=100 with the same 3-stage gate/up ring 525-526 / 464; with 6 stages 561-562 / 491-493; with 8
stages 566-567 / 495-496. Every kernel in the 228 KB configuration (28 KB of L1 left) costs the Triton decode
kernels more than deeper rings gain, so the default stays off and the Gluon kernels fit the 64 KB configuration.
"""
from __future__ import annotations

import ctypes
import os

_ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT = 9  # cuda.h CUfunction_attribute
_ATTR_REQUIRED_CLUSTER_WIDTH = 11  # then 12, 13: height, depth
_DONE: set = set()
_LIB = None


def percent() -> int:
    """KIMI_LOCAL_CARVEOUT: the carveout (percent) every kernel gets; 0 = the driver's choice per kernel."""
    return int(os.environ.get("KIMI_LOCAL_CARVEOUT", "0") or 0)


def _func_attr(fn, attr: int, value: int, what: str):
    """cuFuncSetAttribute(attr, value) on a loaded CUfunction handle."""
    global _LIB
    if _LIB is None:
        _LIB = ctypes.CDLL("libcuda.so.1")
    rc = _LIB.cuFuncSetAttribute(ctypes.c_void_p(fn), ctypes.c_int(attr), ctypes.c_int(value))
    if rc != 0:
        raise RuntimeError(f"cuFuncSetAttribute({what}) failed: CUresult {rc}")


def set_function(fn, pct: int):
    """cuFuncSetAttribute(PREFERRED_SHARED_MEMORY_CARVEOUT, pct) on a loaded CUfunction handle, once per (fn, pct)."""
    if not fn or pct <= 0 or (fn, pct) in _DONE:
        return
    _func_attr(fn, _ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT, pct, f"carveout {pct} %")
    _DONE.add((fn, pct))


def set_cluster_width(fn, n: int):
    """Make every launch of the loaded CUfunction `fn` a grid of thread-block clusters of n x 1 x 1 CTAs (sm_90+;
    n <= 8, the portable limit; grid x must be a multiple of n). The kernel's PTX must not declare a cluster shape
    itself (Triton's does not at num_ctas = 1), else the driver refuses (CUDA_ERROR_NOT_PERMITTED)."""
    for attr, v in ((_ATTR_REQUIRED_CLUSTER_WIDTH, n), (_ATTR_REQUIRED_CLUSTER_WIDTH + 1, 1),
                    (_ATTR_REQUIRED_CLUSTER_WIDTH + 2, 1)):  # width, height, depth
        _func_attr(fn, attr, v, f"cluster {n} x 1 x 1")


def set_kernel(kernel, pct: int):
    """set_function on a launched Triton / Gluon kernel (the object kernel[grid](...) returns)."""
    set_function(getattr(kernel, "function", None), pct)


def _on_load(module, function, name, metadata_group, hash):  # triton.knobs.runtime.kernel_load_end_hook
    set_function(function, percent())


def install():
    """Register the load hook (idempotent). Kernels loaded before this call keep the driver's choice."""
    try:
        from triton import knobs
    except ImportError:  # pragma: no cover (Triton < 3.4: no hook; KIMI_LOCAL_CARVEOUT has no effect)
        return
    knobs.runtime.kernel_load_end_hook.add(_on_load)
