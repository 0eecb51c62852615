"""The CUDA engine against the CPU reference, graph vs eager, MLA prefill attention.
Runs only where a GPU is present (through the device tool); results go to docs/perf-notes.md."""
import pytest
import torch

from kimi_local.config import KimiConfig
from kimi_local.kernels import naive

pytestmark = pytest.mark.cuda


def small_config() -> KimiConfig:
    """Real head dims (K = V = 128, latent 512 + 64) and K-quant-friendly widths, few layers/experts."""
    return KimiConfig(
        vocab_size=1024, hidden_size=512, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        num_experts=16, num_experts_per_token=4, moe_intermediate_size=256,
        kda_layers=[1, 2, 3], full_attn_layers=[4], kda_num_heads=4, kda_head_dim=128,
        bos_token_id=1000, eos_token_id=1002, pad_token_id=1023, model_max_length=8192,
    )


def qtype_of(name, shape):
    if "_exps" in name:
        return "Q6_K" if "down" in name else "Q4_K"
    if name.startswith("token_embd") or name.startswith("output"):
        return "Q6_K"
    return "Q8_0" if shape[-1] % 256 else "Q6_K"


def _models(use_graph=True, kv_cache="bf16"):
    from kimi_local.api import build_net
    from kimi_local.bench import synthetic_weights
    from kimi_local.model import KimiLinear

    cfg = small_config()
    w = synthetic_weights(cfg, qtype_of, "cpu", seed=3)
    w["token_embd.weight"] = w["token_embd.weight"]  # quantized embedding rows are gathered per token
    cpu = KimiLinear(cfg, w, "cpu", torch.float32)
    gpu = build_net(cfg, w, torch.device("cuda"), torch.bfloat16, kv_cache=kv_cache, use_graph=use_graph)
    return cfg, cpu, gpu


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("kv_cache", ["bf16", "fp8"])
def test_gpu_logits_match_cpu_reference(kv_cache):
    cfg, cpu, gpu = _models(kv_cache=kv_cache)
    ids = torch.randint(0, cfg.vocab_size, (70,), generator=torch.Generator().manual_seed(0))
    cc, gc = cpu.new_cache(), gpu.new_cache(max_ctx=256)
    ref = [cpu.forward(ids[:60], cc, "last")] + [cpu.forward(ids[j : j + 1], cc) for j in range(60, 70)]
    out = [gpu.forward(ids[:60], gc, "last")] + [gpu.forward(ids[j : j + 1], gc).clone() for j in range(60, 70)]
    tol = 3e-2 if kv_cache == "bf16" else 6e-2
    for r, o in zip(ref, out):
        assert torch.isfinite(o).all()
        assert _rel(o.cpu(), r) < tol, _rel(o.cpu(), r)


def test_graph_decode_equals_eager_for_256_tokens():
    cfg, _, gpu = _models()
    eager = _models(use_graph=False)[2]
    prompt = torch.randint(0, cfg.vocab_size, (33,), generator=torch.Generator().manual_seed(1))
    seqs = []
    for net in (gpu, eager):
        cache = net.new_cache(max_ctx=512)
        logits = net.forward(prompt, cache)
        toks = []
        for _ in range(256):
            t = torch.argmax(logits[-1]).reshape(1).cpu()
            toks.append(int(t))
            logits = net.forward(t, cache)
        seqs.append(toks)
    assert seqs[0] == seqs[1]


def test_mla_prefill_attention_blocks_match_reference():
    from kimi_local.engine import mla_prefill_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    H, R, Dn, Dr, Dv, p0, T = 4, 512, 128, 64, 128, 300, 77
    q = torch.randn(T, H, Dn + Dr, device="cuda", generator=g).bfloat16()
    lat = torch.randn(p0 + T + 5, R + Dr, device="cuda", generator=g).bfloat16()
    k_b = (0.05 * torch.randn(H, R, Dn, device="cuda", generator=g)).bfloat16()
    v_b = (0.05 * torch.randn(H, Dv, R, device="cuda", generator=g)).bfloat16()
    out = mla_prefill_attention(q, lat, None, k_b, v_b, p0, 192**-0.5, key_block=128)
    ref = naive.mla_expanded(q.float(), lat[: p0 + T, :R].float(), lat[: p0 + T, R:].float(), k_b.float(),
                             v_b.float(), torch.arange(p0, p0 + T, device="cuda"), 192**-0.5)
    assert _rel(out, ref) < 1e-2


def test_kda_prefill_then_decode_matches_reference_state():
    cfg, cpu, gpu = _models()
    ids = torch.randint(0, cfg.vocab_size, (130,), generator=torch.Generator().manual_seed(2))
    cc, gc = cpu.new_cache(), gpu.new_cache(max_ctx=256)
    cpu.forward(ids, cc, "none")
    gpu.forward(ids, gc, "none")
    for i in cfg.kda_layer_ids:
        assert _rel(gc.kda_state[i].cpu(), cc.kda_state[i]) < 3e-2
        assert _rel(gc.conv[i].cpu(), cc.conv[i]) < 1e-2
