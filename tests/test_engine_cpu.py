"""The CUDA engine's decode path (GpuKimi: fused projections, KDA step, MLA split decode, router and
fused MoE kernels) run on the CPU through the Triton interpreter at the tiny model's shapes, against
the pure-torch reference. Its prefill path needs CUDA (fla chunk_kda, SDPA): see test_engine_cuda.py."""
import os

import pytest
import torch

from kimi_local.model import KimiLinear
from kimi_local.weights import HFCheckpoint, load_dense

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                                reason="CPU interpreter run of the engine")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("norm_route", ["1", "0"])  # the MoE layers' add + norm inside the router launch, or not
def test_engine_decode_steps_match_reference(tiny_dir, norm_route, monkeypatch):
    from kimi_local.engine import GpuKimi

    monkeypatch.setenv("KIMI_LOCAL_NORM_ROUTE", norm_route)

    ck = HFCheckpoint(tiny_dir)
    w = load_dense(ck, "cpu", torch.float32)
    ref = KimiLinear(ck.cfg, dict(w), "cpu", torch.float32)
    band = KimiLinear(ck.cfg, dict(w), "cpu", torch.bfloat16)  # the same math in bf16: the tolerance
    eng = GpuKimi(ck.cfg, dict(w), "cpu", torch.bfloat16, use_graph=False)
    caches = [ref.new_cache(), band.new_cache(), eng.new_cache(max_ctx=64)]
    for t in [5, 77, 300, 12, 512]:
        ids = torch.tensor([t])
        r, b, e = (net.forward(ids, c) for net, c in zip((ref, band, eng), caches))
        assert torch.isfinite(e).all()
        assert _rel(e, r) < max(2 * _rel(b, r), 1e-2), (_rel(e, r), _rel(b, r))
    assert caches[2].pos == 5 and caches[2].tokens == [5, 77, 300, 12, 512]
    for i in ck.cfg.kda_layer_ids:  # the recurrent state was updated in place by the step kernel
        assert _rel(caches[2].kda_state[i], caches[0].kda_state[i]) < max(
            2 * _rel(caches[1].kda_state[i], caches[0].kda_state[i]), 1e-2)


def test_engine_fused_quantized_projections_match_reference(tiny_dir, monkeypatch):
    """Quantized (Q8_0) projections of one type are fused: q/k/v/f_a/g_a/beta of a KDA layer and q/kv_a of an
    MLA layer each become one GEMV whose output is sliced. Decode is bit-identical to the unfused engine and
    within the bf16 band of the reference."""
    import kimi_local.engine as E
    from kimi_local.bench import synthetic_weights

    cfg = HFCheckpoint(tiny_dir).cfg
    w = synthetic_weights(cfg, lambda name, shape: "Q8_0" if shape[-1] % 32 == 0 else "BF16", "cpu", seed=1)
    ref = KimiLinear(cfg, dict(w), "cpu", torch.float32)
    band = KimiLinear(cfg, dict(w), "cpu", torch.bfloat16)
    eng = E.GpuKimi(cfg, dict(w), "cpu", torch.bfloat16, use_graph=False)
    assert sum(k.endswith(".qkvfgb") for k in eng.w) == len(cfg.kda_layer_ids)
    assert sum(k.endswith(".attn_q_kv_a") for k in eng.w) == cfg.num_hidden_layers - len(cfg.kda_layer_ids)
    monkeypatch.setattr(E, "_same_qtype", lambda ws: False)
    sep = E.GpuKimi(cfg, dict(w), "cpu", torch.bfloat16, use_graph=False)
    assert not any(k.endswith((".qkvfgb", ".attn_q_kv_a")) for k in sep.w)
    nets = (ref, band, eng, sep)
    caches = [ref.new_cache(), band.new_cache(), eng.new_cache(max_ctx=64), sep.new_cache(max_ctx=64)]
    for t in [7, 300, 41, 650]:
        ids = torch.tensor([t])
        r, b, e, s_ = (net.forward(ids, c) for net, c in zip(nets, caches))
        assert torch.isfinite(e).all() and torch.equal(e, s_)
        assert _rel(e, r) < max(3 * _rel(b, r), 1e-2), (_rel(e, r), _rel(b, r))


def _decode_env_ab(tiny_dir, monkeypatch, var, seed):
    """One engine on Q8_0 synthetic weights (the word-path kernels: experts and layer 0's dense FFN), two caches
    decoding the same tokens with var=1 and var=0 (read at call time): bit-identical logits and KDA states.
    Returns the engine."""
    from kimi_local.bench import synthetic_weights
    from kimi_local.engine import GpuKimi
    from kimi_local.kernels.quant_matmul import WORD_QTYPES

    cfg = HFCheckpoint(tiny_dir).cfg  # Q8_0 experts: the word-path kernels (a float pool routes first)
    w = synthetic_weights(cfg, lambda name, shape: "Q8_0" if shape[-1] % 32 == 0 else "BF16", "cpu", seed=seed)
    g = torch.Generator().manual_seed(seed)
    for name in [n for n in w if n.endswith("norm.weight")]:  # (synthetic norms are ones: a weak test of them)
        w[name] = 1 + 0.2 * torch.randn(w[name].shape, generator=g)
    eng = GpuKimi(cfg, dict(w), "cpu", torch.bfloat16, use_graph=False)
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)]
    assert moe_layers and all(q in WORD_QTYPES for i in moe_layers for q in eng.experts.qtypes(i))
    caches = [eng.new_cache(max_ctx=32), eng.new_cache(max_ctx=32)]
    for t in [7, 300, 41]:
        outs = []
        for env, cache in zip(("1", "0"), caches):
            monkeypatch.setenv(var, env)
            outs.append(eng.forward(torch.tensor([t]), cache))
        assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])
    for i in cfg.kda_layer_ids:
        assert torch.equal(caches[0].kda_state[i], caches[1].kda_state[i])
    return eng


def test_engine_router_topk_in_moe_equals_router_topk(tiny_dir, monkeypatch):
    """Resident experts: the MoE kernels' own top-k over the router logits (default) and the router launch's
    top-k (KIMI_LOCAL_ROUTE_IN_MOE=0) give bit-identical logits and states over several decode steps."""
    _decode_env_ab(tiny_dir, monkeypatch, "KIMI_LOCAL_ROUTE_IN_MOE", seed=3)


def test_engine_norm_in_down(tiny_dir, monkeypatch):
    """One token: the residual add + next attention RMSNorm inside the FFN's down kernel
    (KIMI_LOCAL_NORM_IN_DOWN=1: normed x8 buffer, the projection GEMV applies 1 / rms) against their own norm
    launches (the default): both within the bf16 band of the reference, and rms_norm launches left only for
    layer 0's attention norm, the dense layers' FFN norms and the output norm."""
    import kimi_local.engine as E
    from kimi_local.bench import synthetic_weights

    cfg = HFCheckpoint(tiny_dir).cfg
    w = synthetic_weights(cfg, lambda name, shape: "Q8_0" if shape[-1] % 32 == 0 else "BF16", "cpu", seed=5)
    g = torch.Generator().manual_seed(5)
    for name in [n for n in w if n.endswith("norm.weight")]:  # (synthetic norms are ones: a weak test of them)
        w[name] = 1 + 0.2 * torch.randn(w[name].shape, generator=g)
    ref = KimiLinear(cfg, dict(w), "cpu", torch.float32)
    band = KimiLinear(cfg, dict(w), "cpu", torch.bfloat16)
    eng = E.GpuKimi(cfg, dict(w), "cpu", torch.bfloat16, use_graph=False)
    assert all(eng._reads_normed_x8(i) for i in range(cfg.num_hidden_layers))
    calls = []
    real = E.fused_rms_norm
    monkeypatch.setattr(E, "fused_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    caches = [ref.new_cache(), band.new_cache(), eng.new_cache(max_ctx=32), eng.new_cache(max_ctx=32)]
    for t in [7, 300, 41]:
        ids = torch.tensor([t])
        r, b = ref.forward(ids, caches[0]), band.forward(ids, caches[1])
        outs, n = [], []
        for env, cache in zip(("1", "0"), caches[2:]):
            monkeypatch.setenv("KIMI_LOCAL_NORM_IN_DOWN", env)
            calls.clear()
            outs.append(eng.forward(ids, cache))
            n.append(len(calls))
        L = cfg.num_hidden_layers
        dense = sum(not cfg.is_moe(i) for i in range(L))  # their FFN norm is a launch (MoE: in the router's)
        assert n == [2 + dense, 2 + dense + L - 1], n
        assert torch.isfinite(outs[0]).all() and not torch.equal(outs[0], outs[1])
        # the two differ by x8 roundings (measured 2-4 %, as far as each is from the fp32 reference)
        assert _rel(outs[0], outs[1]) < 3 * _rel(b, r), (_rel(outs[0], outs[1]), _rel(b, r))
        for e in outs:
            assert _rel(e, r) < max(3 * _rel(b, r), 1e-2), (_rel(e, r), _rel(b, r))


def test_engine_with_offloaded_experts_equals_resident(tiny_dir):
    """The engine reading its packed expert pools through kimi_local.offload's slot cache (2 + 1
    slots of 8 per layer, prefetch on) decodes the same greedy tokens as with all experts resident."""
    from kimi_local.engine import GpuKimi
    from kimi_local.offload import apply_offload, resident_bytes, vram_for_slots

    ck = HFCheckpoint(tiny_dir)
    w = load_dense(ck, "cpu", torch.float32)

    def greedy(net):
        cache, out = net.new_cache(max_ctx=64), []
        logits = net.forward(torch.tensor([7]), cache)
        for _ in range(5):
            out.append(int(torch.argmax(logits[-1])))
            logits = net.forward(torch.tensor(out[-1:]), cache)
        return out

    resident = greedy(GpuKimi(ck.cfg, dict(w), "cpu", torch.bfloat16, use_graph=False))
    eng = GpuKimi(ck.cfg, dict(w), "cpu", torch.bfloat16, use_graph=False)
    k, layers = ck.cfg.num_experts_per_token, [i for i in range(ck.cfg.num_hidden_layers) if ck.cfg.is_moe(i)]
    expert_bytes = {L: sum(p[0].numel() * p.element_size() for p in eng.experts.pools(L)) for L in layers}
    off = apply_offload(eng, vram_for_slots(ck.cfg, 64, resident_bytes(eng.w), expert_bytes, k + 1), 64, "lfu", None)
    assert set(off.placement.slots.values()) == {k + 1}
    assert greedy(eng) == resident
    assert 0 < eng.expert_stats.hit_rate < 1


def test_device_loader_tables_survive_prefill_chunks(tiny_dir, tmp_path):
    """Device-side tables (decode) and the host mirror (prefill chunks, pulled and pushed around the
    host-side work) stay one cache: after any mix of chunk and token steps, every slot the loader returns
    holds the bytes of the expert asked for, and the statistics count both kinds of steps."""
    from kimi_local.engine import GpuKimi
    from kimi_local.offload import apply_offload, resident_bytes, vram_for_slots

    ck = HFCheckpoint(tiny_dir)
    cfg = ck.cfg
    eng = GpuKimi(cfg, dict(load_dense(ck, "cpu", torch.float32)), "cpu", torch.bfloat16, use_graph=False)
    k, E = cfg.num_experts_per_token, cfg.num_experts
    layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)]
    expert_bytes = {L: sum(p[0].numel() * p.element_size() for p in eng.experts.pools(L)) for L in layers}
    off = apply_offload(eng, vram_for_slots(cfg, 64, resident_bytes(eng.w), expert_bytes, k + 1), 64, "lru", None)
    assert off.on_device
    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, cfg.hidden_size, generator=g).to(torch.bfloat16)
    for step, T in enumerate([3, 1, 1, 4, 1, 2, 1, 1]):
        for L in layers:
            ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
            slots = off.prepare(L, ids, h[:T])
            pools = off.pools(L)
            for p, raw in zip(pools, off.store.raw[L]):
                assert torch.equal(p[slots.long()], raw[ids.long()]), (step, L)
    from kimi_local.offload import load_profile

    off.save_profile(tmp_path / "p.json")  # device-side counts (token steps) + host counts (chunks)
    prof = load_profile(tmp_path / "p.json", cfg)
    assert all(float(prof[L].sum()) == 14 * k for L in layers)
    st = off.stats
    assert st.lookups > 0 and 0 < st.hit_rate < 1 and st.misses > 0 and st.tokens == 3 + 1 + 1 + 4 + 1 + 2 + 1 + 1


def test_engine_kda_layer_prefill_and_decode_match_reference(tiny_dir):
    """One KDA layer through chunks and single tokens: prefill (T > 1) computes f and z with torch from the
    dense bf16 f_b / g_b, decode (T = 1) inside the step kernel (fg_a = [f_a(h) | g_a(h)]); outputs and state
    stay within twice the bf16 band of the fp32 reference."""
    from kimi_local.engine import GpuKimi

    ck = HFCheckpoint(tiny_dir)
    cfg, w = ck.cfg, load_dense(ck, "cpu", torch.float32)
    nets = (KimiLinear(cfg, dict(w), "cpu", torch.float32), KimiLinear(cfg, dict(w), "cpu", torch.bfloat16),
            GpuKimi(cfg, dict(w), "cpu", torch.bfloat16, use_graph=False))
    i = cfg.kda_layer_ids[0]
    f_b = nets[2].w[f"blk.{i}.ssm_f_b.weight"]
    assert f_b.dtype == torch.bfloat16 and f_b.shape == (cfg.kda_dim, cfg.kda_head_dim)
    caches = [nets[0].new_cache(), nets[1].new_cache(), nets[2].new_cache(max_ctx=64)]
    g = torch.Generator().manual_seed(0)
    for T in (4, 1, 1, 3, 1):
        h = torch.randn(T, cfg.hidden_size, generator=g)
        r, b, e = (net.kda(i, h.to(net.dtype), c) for net, c in zip(nets, caches))
        assert torch.isfinite(e).all()
        assert _rel(e, r) < max(2 * _rel(b, r), 1e-2), (T, _rel(e, r), _rel(b, r))
        s_r, s_b, s_e = (c.kda_state[i] for c in caches)
        assert _rel(s_e, s_r) < max(2 * _rel(s_b, s_r), 1e-2), (T, _rel(s_e, s_r), _rel(s_b, s_r))


def test_dense_ffn_through_the_moe_kernels(tiny_dir, monkeypatch):
    """One token: layer 0's dense FFN (Q8_0) through moe_decode as the only expert equals the three-GEMV path
    within the int8-activation rounding (and the GEMV path matches the fp32 reference)."""
    import kimi_local.engine as E
    from kimi_local.bench import synthetic_weights

    cfg = HFCheckpoint(tiny_dir).cfg
    assert not cfg.is_moe(0)
    w = synthetic_weights(cfg, lambda name, shape: "Q8_0" if shape[-1] % 32 == 0 else "BF16", "cpu", seed=2)
    eng = E.GpuKimi(cfg, dict(w), "cpu", torch.bfloat16, use_graph=False)
    h = torch.randn(1, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    fused = eng.dense_mlp(0, h)
    monkeypatch.setenv("KIMI_LOCAL_DENSE_FUSED", "0")
    plain = eng.dense_mlp(0, h)
    ref = (torch.nn.functional.silu(h.float() @ w["blk.0.ffn_gate.weight"].dequantize().t())
           * (h.float() @ w["blk.0.ffn_up.weight"].dequantize().t())) @ w["blk.0.ffn_down.weight"].dequantize().t()
    assert _rel(plain, ref) < 2e-2 and _rel(fused, ref) < 2e-2, (_rel(plain, ref), _rel(fused, ref))
    assert _rel(fused, plain) < 2e-2
