"""The whole model on CPU: state carried across chunks, determinism, HF layout, load errors."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open

import kimi_local
from kimi_local.config import ModelError, tiny_config
from kimi_local.quant.hf_names import hf_shapes


def test_tiny_checkpoint_layout(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "kimi_linear" and cfg["q_lora_rank"] is None
    lac = cfg["linear_attn_config"]
    assert lac["full_attn_layers"] == [4, 6] and lac["short_conv_kernel_size"] == 4
    assert cfg["num_experts"] >= 8 and cfg["num_experts_per_token"] >= 2 and cfg["num_shared_experts"] == 1
    assert cfg["kv_lora_rank"] < cfg["hidden_size"]
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2
    assert set(index["weight_map"]) == set(hf_shapes(tiny_config()))
    for shard in shards:
        with safe_open(str(tiny_dir / shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                want = torch.float32 if name.endswith(("A_log", "dt_bias")) else torch.bfloat16
                assert t.dtype == want, name
    assert "model.layers.1.block_sparse_moe.experts.7.w2.weight" in index["weight_map"]
    assert "model.layers.3.self_attn.kv_b_proj.weight" in index["weight_map"]
    assert (tiny_dir / "tiktoken.model").is_file() and (tiny_dir / "chat_template.jinja").is_file()


def test_chunked_prefill_and_decode_equal_one_prefill(tiny_model):
    net = tiny_model.net
    ids = torch.randint(0, 500, (45,), generator=torch.Generator().manual_seed(1))
    full = net.forward(ids, net.new_cache(), logits="all")
    cache = net.new_cache()
    parts = [net.forward(ids[:7], cache, "all"), net.forward(ids[7:30], cache, "all")]
    parts += [net.forward(ids[j : j + 1], cache, "all") for j in range(30, 45)]
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-4, atol=1e-4)
    assert cache.pos == 45 and cache.tokens == ids.tolist()


def test_logits_deterministic_and_sane(tiny_dir, tiny_model):
    ids = [1, 2, 3, 50, 400]
    a = tiny_model.logits(ids)
    b = kimi_local.load(tiny_dir, device="cpu").logits(ids)
    assert a.shape == (5, tiny_config().vocab_size) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert torch.isfinite(a).all() and a.std() > 0.1


def test_cache_snapshot_restore(tiny_model):
    net = tiny_model.net
    ids = torch.arange(10, 30)
    cache = net.new_cache()
    net.forward(ids[:12], cache, "none")
    snap = cache.clone()
    a = net.forward(ids[12:], cache, "all")
    cache.restore(snap)
    b = net.forward(ids[12:], cache, "all")
    torch.testing.assert_close(a, b)


def _copy(tiny_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    return d


def _expect(path, fragment):
    with pytest.raises(ModelError, match=fragment):
        kimi_local.load(path, device="cpu")


def test_error_path_missing(tmp_path):
    _expect(tmp_path / "nope", "no such file or directory")


def test_error_not_kimi_config(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    _expect(d, "not a Kimi-Linear model")


def test_error_no_config(tmp_path):
    _expect(tmp_path, "no config.json")


def test_error_unsupported_value(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["q_lora_rank"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    _expect(d, "unsupported config value q_lora_rank=64")


def test_error_missing_shard(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    (d / "model-00002-of-00003.safetensors").unlink()
    _expect(d, "missing shard model-00002-of-00003.safetensors")


def test_error_missing_tensor(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    del idx["weight_map"]["model.layers.2.self_attn.b_proj.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    _expect(d, "missing tensor model.layers.2.self_attn.b_proj.weight")


def test_error_wrong_shape(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    _expect(d, r"has shape \[32, 64\], expected \[48, 64\]")


@pytest.mark.parametrize("how", ["truncate", "garbage_header", "short"])
def test_error_corrupt_safetensors(tiny_dir, tmp_path, how):
    d = _copy(tiny_dir, tmp_path)
    p = d / "model-00001-of-00003.safetensors"
    raw = p.read_bytes()
    p.write_bytes({"truncate": raw[: len(raw) // 2], "garbage_header": raw[:8] + b"\xff" * 64 + raw[72:],
                   "short": raw[:5]}[how])
    _expect(d, "corrupt safetensors")
