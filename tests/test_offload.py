"""Expert offloading (kimi_local/offload.py) on CPU: the emulated budget goes through the same placement,
slot pools, copies, staging and prefetch as on the GPU, so generation must equal the all-resident model."""
import json
import os
import subprocess
import sys

import pytest
import torch

from kimi_local.config import KimiConfig, ModelError, tiny_config
from kimi_local.generate import SamplingParams, generate
from kimi_local.model import ResidentExperts
from kimi_local.offload import (
    OffloadError, allocate_slots, apply_offload, load_profile, miss_costs, parse_size, plan_pinning,
    plan_placement, resident_bytes, save_profile, simulate_hit_rate, synthetic_trace, vram_for_slots,
)

# bartowski Q4_K_M-class expert: Q4_K gate/up + Q6_K down; non-expert weights ~Q8_0 (8.5 bits)
Q4KM_EXPERT = 2 * 1_327_104 + 1_935_360
Q8_REST = 2_012_259_200 * 17 // 16


# ---- placement math with the real config ---------------------------------------------------------
def test_parse_size_is_shared():
    assert parse_size("24GB") == 24 * 10**9 and parse_size("22.5GiB") == int(22.5 * 2**30)
    assert parse_size("800MB") == 800 * 10**6


def test_placement_real_model_24gb_128k():
    cfg = KimiConfig()
    p = plan_placement(cfg, parse_size("24GB"), 131072, Q8_REST, Q4KM_EXPERT)
    s = sorted(p.slots.values())
    assert len(s) == 26 and s[-1] - s[0] <= 1  # uniform popularity -> even split
    assert 130 <= s[0] <= 170, p.describe()  # ~60% of the 256 experts of each layer stay on the GPU
    assert p.kv_cache == 131072 * 8064 and p.staging == 256 * Q4KM_EXPERT
    assert p.reserved + p.pool_bytes <= p.vram < p.reserved + p.pool_bytes + Q4KM_EXPERT
    fp8 = plan_placement(cfg, parse_size("24GB"), 131072, Q8_REST, Q4KM_EXPERT, kv_bytes_per_value=1)
    assert sum(fp8.slots.values()) > sum(p.slots.values())
    # a budget with room for everything: no staging, all experts resident
    big = plan_placement(cfg, parse_size("40GB"), 131072, Q8_REST, Q4KM_EXPERT)
    assert big.all_resident and big.staging == 0


def test_placement_too_small_names_flags():
    cfg = KimiConfig()
    with pytest.raises(OffloadError) as e:
        plan_placement(cfg, parse_size("11GB"), 1048576, Q8_REST, Q4KM_EXPERT)
    msg = str(e.value)
    assert "--ctx" in msg and "--kv-cache fp8" in msg and "smaller recipe" in msg and "8 expert slots" in msg
    with pytest.raises(ModelError, match="smaller recipe"):
        plan_placement(cfg, parse_size("3GB"), 4096, Q8_REST, Q4KM_EXPERT)


def test_allocate_slots_follows_popularity():
    eb = {1: 100, 2: 100}
    even = allocate_slots(100 * 20, eb, k=2, E=16)
    assert even == {1: 10, 2: 10}
    skew = torch.tensor([50.0, 40, 30, 20] + [0.01] * 12)
    pop = {1: skew, 2: torch.ones(16)}
    got = allocate_slots(100 * 20, eb, k=2, E=16, popularity=pop)
    assert sum(got.values()) == 20 and got[1] < got[2] and got[1] >= 4
    assert allocate_slots(100 * 3, eb, k=2, E=16) is None


def test_plan_pinning_pins_what_fits():
    gib = 1 << 30
    assert plan_pinning({1: 2 * gib, 2: 2 * gib, 3: 2 * gib}, 9 * gib, headroom=4 * gib) == [1, 2]
    assert plan_pinning({1: gib}, 100 * gib) == [1]


# ---- policies on synthetic traces ----------------------------------------------------------------
def test_policies_on_synthetic_traces():
    E, k, S = 64, 4, 24
    zipf = synthetic_trace(1500, E, k, zipf_s=1.0, seed=3)
    uni = synthetic_trace(1500, E, k, seed=3)
    z_lru, z_lfu = (simulate_hit_rate(p, zipf, S, E, warmup=200) for p in ("lru", "lfu"))
    u_lru, u_lfu = (simulate_hit_rate(p, uni, S, E, warmup=200) for p in ("lru", "lfu"))
    assert z_lfu >= z_lru > u_lru
    assert abs(u_lru - S / E) < 0.05 and abs(u_lfu - S / E) < 0.05  # nothing to learn from uniform


# ---- the tiny model, offloaded on CPU --------------------------------------------------------------
PROMPT = list(range(20, 60))


def _greedy(net, n=10):
    return list(generate(net, net.new_cache(), PROMPT, SamplingParams(temperature=0), n))


@pytest.fixture(scope="module")
def reference(tiny_model):
    return _greedy(tiny_model.net)


@pytest.fixture
def offloaded(tiny_model):
    """Offload the session's tiny model for one test, then put its resident experts back."""
    net = tiny_model.net
    saved = net.experts
    yield net
    net.experts = saved
    if hasattr(net, "expert_stats"):
        del net.expert_stats


def _expert_bytes(net):
    return {L: sum(t[0].numel() * t[0].element_size() for t in net.experts.pools(L))
            for L in range(1, net.cfg.num_hidden_layers)}


def _vram(net, n, ctx=512):
    return vram_for_slots(net.cfg, ctx, resident_bytes(net.w), _expert_bytes(net), n)


@pytest.mark.parametrize("extra", [0, 2])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("prefetch", [True, False])
def test_offloaded_generation_equals_resident(offloaded, reference, policy, prefetch, extra):
    net = offloaded
    k = net.cfg.num_experts_per_token
    off = apply_offload(net, _vram(net, k + extra), 512, policy, None, prefetch=prefetch)
    assert set(off.placement.slots.values()) == {k + extra}
    assert _greedy(net) == reference
    st = net.expert_stats
    eb = off.store.expert_bytes[1]
    assert 0.0 <= st.hit_rate <= 1.0 and st.misses > 0 and st.hits + st.misses == st.lookups
    assert st.h2d_bytes == (st.misses + st.prefetched) * eb
    assert st.staged_steps > 0  # the 40-token prefill needs more experts than the pool holds
    assert st.tokens == len(PROMPT) + 10 and st.stall_s >= 0 and st.h2d_gbps > 0
    if prefetch:
        assert st.prefetched > 0 and 0 < st.prefetch_recall <= 1 and 0 < st.prefetch_precision <= 1
    else:
        assert st.prefetched == 0 and st.guessed == 0
    assert "hit rate" in st.summary()


def test_all_resident_budget_never_misses(offloaded, reference):
    net = offloaded
    off = apply_offload(net, _vram(net, net.cfg.num_experts), 512, "lfu", None)
    assert off.placement.all_resident and off._staging is None
    assert _greedy(net) == reference and net.expert_stats.misses == 0 and net.expert_stats.hit_rate == 1.0


def test_miss_costs_measures_both_ways(offloaded):
    off = apply_offload(offloaded, _vram(offloaded, 4), 512, "lfu", None)
    r = miss_costs(off.store, 1, "cpu", reps=1)
    assert 0 < r["copy_ms"] < float("inf") and 0 < r["cpu_ms"] < float("inf") and r["use"] in ("copy", "cpu")


def test_budget_too_small(offloaded):
    net = offloaded
    with pytest.raises(OffloadError, match="--ctx"):
        apply_offload(net, _vram(net, net.cfg.num_experts_per_token) - 1, 512, "lru", None)
    assert isinstance(net.experts, ResidentExperts)  # nothing was changed
    with pytest.raises(ModelError, match="expert-policy"):
        apply_offload(net, _vram(net, 4), 512, "fifo", None)


def test_profile_round_trip_and_placement(offloaded, reference, tmp_path):
    net = offloaded
    off = apply_offload(net, _vram(net, 3), 512, "lfu", None)
    _greedy(net)
    path = tmp_path / "experts.json"
    off.save_profile(path)
    counts = load_profile(path, net.cfg)
    assert set(counts) == set(off.layers)
    k = net.cfg.num_experts_per_token
    assert all(float(c.sum()) == (len(PROMPT) + 10) * k for c in counts.values())
    for L in off.layers:
        assert torch.allclose(counts[L], off.stats.counts[L])
    # a profile puts each layer's most used experts in the pool from the start
    net.experts = ResidentExperts(net.w)
    off2 = apply_offload(net, _vram(net, 3), 512, "lfu", path)
    assert sum(c.S for c in off2.cache.values()) == 3 * len(off2.layers)
    for L in off2.layers:
        S = off2.cache[L].S  # skewed layers get fewer slots, flat ones more
        top = set(torch.argsort(counts[L], descending=True, stable=True)[:S].tolist())
        assert set(off2.cache[L].slot_expert.tolist()) == top
    assert _greedy(net) == reference
    off2.save_profile(path, off2.profile)  # accumulates
    assert float(load_profile(path, net.cfg)[1].sum()) == 2 * (len(PROMPT) + 10) * k
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "kimi-local-expert-profile", "num_experts": 3, "layers": {}}))
    with pytest.raises(ModelError, match="3 experts"):
        load_profile(bad, net.cfg)
    bad.write_text("[1, 2]")
    with pytest.raises(ModelError, match="not a kimi-local expert profile"):
        load_profile(bad, net.cfg)


def test_save_profile_format(tmp_path):
    cfg = tiny_config()
    save_profile(tmp_path / "p.json", {1: torch.arange(8.0)}, cfg, tokens=5)
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["format"] == "kimi-local-expert-profile" and d["tokens"] == 5 and d["layers"]["1"][7] == 7.0


# ---- the CLI -------------------------------------------------------------------------------------
def _run(args):
    return subprocess.run([sys.executable, "-m", "kimi_local.cli", *args], input=b"", capture_output=True,
                          timeout=300, env=dict(os.environ))


def test_run_with_vram_on_cpu(tiny_dir, tiny_model, tmp_path):
    net = tiny_model.net
    vram = _vram(net, net.cfg.num_experts_per_token, ctx=256)
    base = ["run", str(tiny_dir), "-p", "Hello there", "-n", "6", "--temperature", "0", "--device", "cpu",
            "--ctx", "256"]
    prof = tmp_path / "prof.json"
    r = _run(base + ["--vram", str(vram), "--stats", "--save-expert-profile", str(prof)])
    assert r.returncode == 0, r.stderr.decode()
    assert b"hit rate" in r.stderr and prof.is_file()
    plain = _run(base)
    assert plain.returncode == 0 and plain.stdout == r.stdout
    r = _run(base + ["--vram", str(vram - 1)])
    assert r.returncode == 1 and b"--vram" in r.stderr and b"would fit with" in r.stderr


# ---- the GPU (device suite) ------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("prefetch,loader,policy", [(True, "device", "lfu"), (False, "device", "lru"),
                                                    (True, "host", "lfu"), (False, "host", "lru")])
def test_offloaded_generation_equals_resident_cuda(tiny_dir, prefetch, loader, policy):
    """Side-stream copies, events, staging and prefetch on a real GPU: same greedy tokens. The device
    loader decodes from the CUDA graph (decisions + zero-copy miss copies inside it)."""
    import kimi_local

    ref = _greedy(kimi_local.load(tiny_dir, device="cuda").net)
    net = kimi_local.load(tiny_dir, device="cuda").net
    k = net.cfg.num_experts_per_token
    off = apply_offload(net, _vram(net, k), 512, policy, None, prefetch=prefetch, loader=loader)
    assert off.store.raw[1][0].is_pinned() and off.cache[1].pools[0].is_cuda
    assert off.on_device == (loader == "device") and net.use_graph == (loader == "device")
    assert _greedy(net) == ref
    assert bool(net._graphs) == (loader == "device")
    st = net.expert_stats
    assert st.misses > 0 and st.staged_steps > 0 and st.h2d_gbps > 0 and st.stall_ms_per_token >= 0
    assert st.h2d_bytes == (st.misses + st.prefetched) * off.store.expert_bytes[1]
    assert "hit rate" in st.summary()
