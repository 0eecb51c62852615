"""What the CUDA engine keeps in memory, pinned to the recipe's byte count: prepare_weights on the CPU
for a config with the real widths (hidden 2304, KDA 32x128, MLA 32 heads, experts 1024 wide, dense
FFN 9216) but 4 layers, 8 experts and a small vocabulary. The prepared bytes must equal
recipe.engine_weight_bytes exactly, and exceed recipe.weight_bytes only by the documented items."""
import math

import pytest
import torch

from kimi_local.bench import memory_account
from kimi_local.config import KimiConfig
from kimi_local.quant.recipe import RECIPES, canonical_shapes, engine_weight_bytes, weight_bytes


def _cfg() -> KimiConfig:
    return KimiConfig(vocab_size=4096, num_hidden_layers=4, kda_layers=[1, 2, 3], full_attn_layers=[4],
                      num_experts=8, num_experts_per_token=2, model_max_length=4096,
                      bos_token_id=4000, eos_token_id=4001, pad_token_id=4095)


def _random_weights(cfg, recipe) -> dict:
    """Canonical weights with random bytes in each tensor's recipe type (repacking only moves bytes)."""
    from kimi_local.quant.formats import QTensor, row_nbytes

    g = torch.Generator().manual_seed(0)
    w = {}
    for name, s in canonical_shapes(cfg).items():
        q = RECIPES[recipe].qtype(name, s)
        if q == "F32" or name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
            w[name] = torch.randn(s, generator=g)
        else:
            w[name] = QTensor(torch.randint(0, 256, (*s[:-1], row_nbytes(q, s[-1])), dtype=torch.uint8, generator=g),
                              q, s)
    return w


def _prepared(cfg, recipe, embed_store=None):
    from kimi_local.engine import prepare_weights

    w = _random_weights(cfg, recipe)
    out, experts = prepare_weights(cfg, w, "cpu", embed_store=embed_store)
    assert not w  # every canonical tensor was consumed

    class Net:  # what memory_account reads
        pass

    net = Net()
    net.w, net.experts, net.cfg, net.device = out, experts, cfg, torch.device("cpu")
    return net


@pytest.mark.parametrize("recipe", ["Q2_K", "Q3_K_M", "Q4_K_M"])
def test_prepared_bytes_equal_recipe_count(recipe):
    cfg = _cfg()
    net = _prepared(cfg, recipe)
    acc = memory_account(net)
    r = RECIPES[recipe]
    assert acc["total"] == engine_weight_bytes(r, cfg)
    # the only differences from the file's bytes: packed K-quant scales (experts' Q3_K/Q4_K/Q5_K
    # and any K-quant "rest"), MLA k_b/v_b as bf16: a few percent, never more
    file_bytes = weight_bytes(r, cfg)
    assert file_bytes <= acc["total"] <= 1.04 * file_bytes
    shapes = canonical_shapes(cfg)
    kv_b = sum(2 * math.prod(s) for n, s in shapes.items() if n.endswith(("attn_k_b.weight", "attn_v_b.weight")))
    assert acc["MLA k_b/v_b (bf16)"] == kv_b
    # nothing is held twice: the shared experts' kernel form is the GpuWeight's own storage
    for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        b = f"blk.{i}."
        forms, gws = net.w[b + "shexp"][0], net.w[b + "shexp_w"]
        assert all(f.untyped_storage().data_ptr() == g.data.untyped_storage().data_ptr() for f, g in zip(forms, gws))


def test_token_embedding_in_host_memory():
    cfg = _cfg()
    r = RECIPES["Q2_K"]
    net = _prepared(cfg, "Q2_K", embed_store="cpu")
    acc = memory_account(net)
    # on the CPU the "host" table is on the net's device; the recipe count without it is the rest
    emb = net.w["token_embd.weight"]
    assert emb.qtype == r.qtype("token_embd.weight", (cfg.vocab_size, cfg.hidden_size))  # kept quantized
    assert acc["token_embd"] == emb.data.numel()
    assert acc["total"] - acc["token_embd"] == engine_weight_bytes(r, cfg, embed_on_host=True)


def test_real_model_q2k_account():
    """The numbers of docs/perf-notes.md "1M context in 24 GB: memory account" (computed)."""
    cfg = KimiConfig()
    r = RECIPES["Q2_K"]
    assert weight_bytes(r, cfg) == 18_764_900_992  # 17.48 GiB
    # 17.75 GiB: +Q3_K packed scales, +k_b/v_b bf16, +f_b/g_b as bf16 instead of Q8_0 (20 x 2 x 491,520 = 19,660,800)
    assert engine_weight_bytes(r, cfg) == 19_061_009_024
    assert engine_weight_bytes(r, cfg, embed_on_host=True) == 18_751_351_424  # 17.46 GiB


def test_engine_with_host_embedding_decodes_the_same(tiny_dir):
    """The engine with its embedding table in host memory (embed_store="cpu") gives the same logits
    as with the table on the device (on the CPU both are the same memory; this pins the code path:
    gather where the table is, dequantize on the device, embedded rows as the body's input)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
        pytest.skip("CPU interpreter run of the engine")
    from kimi_local.engine import GpuKimi
    from kimi_local.quant.formats import QTensor
    from kimi_local.weights import HFCheckpoint, load_dense

    ck = HFCheckpoint(tiny_dir)
    w = load_dense(ck, "cpu", torch.float32)
    w["token_embd.weight"] = QTensor.from_float(w["token_embd.weight"], "Q8_0")
    a = GpuKimi(ck.cfg, dict(w), "cpu", torch.bfloat16, use_graph=False, embed_store=None)
    b = GpuKimi(ck.cfg, dict(w), "cpu", torch.bfloat16, use_graph=False, embed_store="cpu")
    ca, cb = a.new_cache(max_ctx=64), b.new_cache(max_ctx=64)
    for t in (5, 77, 300, 12):
        ids = torch.tensor([t])
        assert torch.equal(a.forward(ids, ca), b.forward(ids, cb))
    x = b._embed(torch.tensor([7, 9]))
    assert x.shape == (2, ck.cfg.hidden_size) and x.dtype == torch.bfloat16
    assert torch.equal(x, a._embed(torch.tensor([7, 9])))
    # the decode graph's input when the table is on the host: the embedded row instead of the id
    assert torch.equal(b.decode_body(x[:1].clone(), cb), a.decode_body(torch.tensor([7]), ca))
