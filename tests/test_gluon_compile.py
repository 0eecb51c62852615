"""The Gluon kernels (kernels/moe_gluon.py, moe_prefill_gluon.py, mla_gluon.py) compile for sm_90 on this machine, no GPU needed.

The CPU interpreter cannot run Gluon, so without this test CI would not notice a Gluon kernel that no longer builds
(Gluon is experimental and changes between Triton releases). scripts/gluon_compile.py compiles every configuration
the engine launches (and the A/B variants) to a cubin in a subprocess without TRITON_INTERPRET; this test checks that
each one built, spills nothing, and keeps the shared memory its design relies on: the MoE kernels must stay resident
beside the Triton decode kernels in the 64 KB carveout (moe_gluon's module doc: 5 gate/up CTAs per SM, the down
kernel's two 2 KB stages)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARVEOUT_BYTES = 64 * 1024  # the decode kernels' shared-memory configuration
CTA_RESERVED = 1024  # shared memory the driver reserves per CTA on sm_90


@pytest.fixture(scope="module")
def built():
    try:
        from triton.experimental import gluon  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no Gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gluon_compile.py"), "--json"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"gluon_compile.py printed no results (rc {r.returncode}): {r.stderr[-2000:]}"
    return json.loads(lines[-1])


def test_every_gluon_kernel_builds_without_spills(built):
    assert len(built) == 28  # scripts/gluon_compile.py cases(): the defaults and the A/B variants
    for name, r in built.items():
        assert "error" not in r, (name, r.get("error"))
        assert r["local_bytes"] in (0, None), (name, r)  # None: no cuobjdump in this Triton build


def test_moe_gluon_shared_memory_fits_the_carveout(built):
    from kimi_local.kernels import moe_gluon
    per_sm = -(-576 // 132)  # gate/up: 9 experts x 64 f-tiles of 16 rows, one wave on 132 SMs
    for name, r in built.items():
        if name.startswith("moe_gate_up"):
            assert per_sm * (r["shared"] + CTA_RESERVED) <= CARVEOUT_BYTES, (name, r)
        elif name.startswith("moe_down"):
            ns = int(name.rsplit("ns=", 1)[1].split()[0])
            assert r["shared"] <= ns * 2048 + 256, (name, r)  # the ring and little else
    assert moe_gluon.DOWN_NS == 2
    for norm in (0, 1):  # the default down, and with the residual add + next norm's x8 (engine.body) fused in
        assert f"moe_down Q5_K+Q8_0 route=1 ns={moe_gluon.DOWN_NS} norm={norm}" in built


def test_moe_prefill_gluon_fits(built):
    """The prefill kernels (kernels/moe_prefill_gluon.py): every tile size and type builds within sm_90's shared memory
    per CTA; the Q4_K ones up to 64-row tiles with room for a second CTA on the SM."""
    names = [n for n in built if n.startswith("moe_prefill_")]
    assert len(names) == 9
    for name in names:
        r = built[name]
        assert r["shared"] <= 227 * 1024, (name, r)
        if "Q4_K" in name and int(name.rsplit("BM=", 1)[1]) <= 64:
            assert 2 * (r["shared"] + CTA_RESERVED) <= 228 * 1024, (name, r)


def test_mla_gluon_shared_memory_fits_one_cta(built):
    for name in ("mla_split bf16", "mla_split fp8"):
        assert built[name]["shared"] <= 227 * 1024, built[name]  # sm_90's per-CTA maximum
