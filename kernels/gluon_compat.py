"""Gluon (Triton's experimental lower-level language), imported once for the Hopper kernels (moe_gluon.py,
moe_prefill_gluon.py, mla_gluon.py).

Gluon ships with Triton >= 3.5, the CPU interpreter cannot run it, and it renames things between releases: 3.6 has
`thread_barrier` and `async_copy_global_to_shared`, 3.9 `barrier` and `async_load`. `_barrier` and `_async_load` are
the names this Triton has. HAVE_GLUON: the cp.async kernels (moe_gluon) can be built; HAVE_WGMMA: also the ones that
use Hopper's warpgroup MMA (moe_prefill_gluon, mla_gluon). A missing name switches off only the kernels that need it.
"""
try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    _async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    HAVE_GLUON = True
except (ImportError, AttributeError):  # pragma: no cover
    gluon = gl = cp = _async_load = _barrier = None
    HAVE_GLUON = False

try:
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
    HAVE_WGMMA = HAVE_GLUON
except (ImportError, AttributeError):  # pragma: no cover
    fence_async_shared = warpgroup_mma = warpgroup_mma_wait = None
    HAVE_WGMMA = False

if HAVE_GLUON:  # PDL (kernels/pdl.py's rule): wait for the previous kernel / let the next one launch

    @gluon.jit
    def _gdc_wait():
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def _gdc_launch_dependents():
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
