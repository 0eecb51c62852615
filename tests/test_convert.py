"""HF checkpoint -> GGUF: logits, metadata/names/shapes (spec 5), recipes and --fit, atomic writes,
bad input."""
import errno
import json
import math
import shutil

import gguf
import numpy as np
import pytest
import torch
from kquant_model import kquant_config, rel_rmse
from safetensors import safe_open
from typer.testing import CliRunner

import kimi_local
from kimi_local.cli import app
from kimi_local.config import KimiConfig, ModelError, tiny_config
from kimi_local.quant import convert as convert_mod
from kimi_local.quant.convert import choose_recipe, convert
from kimi_local.quant.formats import dequantize, quantize
from kimi_local.quant.recipe import (FIT_ORDER, QUANT_TYPES, RECIPES, canonical_shapes, fallback_type, fit,
                                     get_recipe, memory, parse_size, uniform, weight_bytes)
from kimi_local.tiny import make_checkpoint
from kimi_local.weights import HFCheckpoint

IDS = list(range(1, 40)) + [512, 600, 700]


@pytest.fixture(scope="module")
def hf_logits(tiny_dir):
    return kimi_local.load(tiny_dir, device="cpu").logits(IDS)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory, tiny_dir):
    """The tiny checkpoint converted with F32 and F16 (shared by the tests below)."""
    d = tmp_path_factory.mktemp("gguf")
    for r in ("F32", "F16"):
        convert(tiny_dir, d / f"tiny-{r}.gguf", get_recipe(r), progress=False)
    return d


# ---- logits ------------------------------------------------------------------------------------
def test_f32_and_f16_gguf_logits_equal_hf(gguf_dir, hf_logits):
    f32 = kimi_local.load(gguf_dir / "tiny-F32.gguf", device="cpu").logits(IDS)
    assert rel_rmse(f32, hf_logits) < 1e-5  # bf16 weights are exact in F32 (measured: 0.0)
    f16 = kimi_local.load(gguf_dir / "tiny-F16.gguf", device="cpu").logits(IDS)
    assert rel_rmse(f16, hf_logits) < 1e-5  # bf16 -> fp16 rounds only values outside fp16 range (measured 6e-7)


@pytest.fixture(scope="module")
def kq(tmp_path_factory):
    """A checkpoint with 256-wide rows, converted with Q8_0 and Q4_K_M, and its HF logits."""
    d = tmp_path_factory.mktemp("kq")
    src = make_checkpoint(d / "ckpt", kquant_config(), seed=1)
    for r in ("Q8_0", "Q4_K_M"):
        convert(src, d / f"{r}.gguf", get_recipe(r), progress=False)
    return d, src, kimi_local.load(src, device="cpu").logits(IDS)


@pytest.mark.parametrize("recipe,tol", [("Q8_0", 0.05), ("Q4_K_M", 0.2)])
def test_quantized_gguf_logits(kq, recipe, tol):
    """Relative RMSE of the logits vs the bf16 checkpoint (measured: Q8_0 0.022, Q4_K_M 0.094; this
    random model amplifies weight noise ~5x). The bytes of quantized tensors equal formats.quantize."""
    d, src, ref = kq
    path = d / f"{recipe}.gguf"
    m = kimi_local.load(path, device="cpu")
    assert rel_rmse(m.logits(IDS), ref) < tol
    r = get_recipe(recipe)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_gate_exps.weight"] == r.experts and types["blk.1.ffn_down_exps.weight"] == r.experts_down
    assert types["blk.1.ffn_gate_inp.weight"] == "F32" and types["blk.0.attn_q.weight"] == r.rest
    tensors = dict(HFCheckpoint(src).iter_canonical())
    for name in ("blk.1.ffn_down_exps.weight", "token_embd.weight"):
        t = tensors[name]
        raw = next(x for x in reader.tensors if x.name == name).data
        want = quantize(t, types[name]).numpy()
        assert np.array_equal(np.asarray(raw).reshape(want.shape), want), name


def test_every_recipe_and_quant_type_fits_tiny(tmp_path, tiny_dir):
    """Rows of 64 (tiny hidden) take Q8_0 instead of a K-quant and rows of 16 F16: every recipe and
    --quant type gives a valid plan; three of them are written and run."""
    cfg = tiny_config()
    for r in [*RECIPES.values(), *map(uniform, QUANT_TYPES)]:
        types = {p.qtype for p in convert_mod.plan(cfg, r)}
        assert types <= {"F32", "F16", "BF16", "Q8_0"}, (r.name, types)
    for r in (get_recipe("Q2_K"), get_recipe("BF16"), uniform("Q5_K")):
        rep = convert(tiny_dir, tmp_path / "t.gguf", r, progress=False, force=True)
        assert rep.types["F32"] == 49 and rep.types.get("F16", 0) == (10 if r.name != "BF16" else 0)
        assert torch.isfinite(kimi_local.load(tmp_path / "t.gguf", device="cpu").logits([1, 2, 3])).all()
    assert list(tmp_path.iterdir()) == [tmp_path / "t.gguf"]


# ---- the file: metadata, names, shapes (spec 5.2, 5.3, 10) ---------------------------------------
def test_gguf_metadata_names_shapes_match_spec(gguf_dir, tiny_dir):
    cfg = tiny_config()
    r = gguf.GGUFReader(gguf_dir / "tiny-F32.gguf")
    kv = {k: f.contents() for k, f in r.fields.items()}
    a = "kimi-linear."
    assert kv["general.architecture"] == "kimi-linear"
    assert kv[a + "attention.head_count_kv"] == [0, 0, 0, 1, 0, 1]  # 1 on MLA (1-indexed 4, 6)
    expect = {
        "block_count": 6, "context_length": cfg.model_max_length, "embedding_length": 64, "feed_forward_length": 128,
        "vocab_size": cfg.vocab_size, "attention.head_count": 4, "attention.key_length": 32 + 8,
        "attention.key_length_mla": 24, "attention.value_length_mla": 16, "attention.kv_lora_rank": 32,
        "rope.dimension_count": 8, "ssm.conv_kernel": 4, "kda.head_dim": 16, "expert_count": 8,
        "expert_used_count": 2, "expert_feed_forward_length": 32, "expert_shared_count": 1,
        "expert_gating_func": 2, "leading_dense_block_count": 1,
    }
    for k, v in expect.items():
        assert kv[a + k] == v, k
    assert kv[a + "expert_weights_scale"] == pytest.approx(2.446)
    assert kv[a + "attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "kimi-k2"
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size == len(set(tokens)) == len(kv["tokenizer.ggml.token_type"])
    assert tokens[kv["tokenizer.ggml.bos_token_id"]] == "[BOS]" and tokens[kv["tokenizer.ggml.eos_token_id"]] == "[EOS]"
    assert tokens[kv["tokenizer.ggml.padding_token_id"]] == "[PAD]"
    assert len(kv["tokenizer.ggml.merges"]) > 0 and "<|im_middle|>" in kv["tokenizer.chat_template"]

    shapes = {t.name: t.shape.tolist() for t in r.tensors}  # ggml ne order, fastest first
    assert list(shapes) == list(canonical_shapes(cfg))
    n_kda, n_mla, n_moe = 4, 2, 5
    assert len(shapes) == 3 + 6 * 3 + n_kda * 14 + n_mla * 5 + 3 + n_moe * 8  # spec 5.2's count for 6 layers
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.KIMI_LINEAR]}
    for name in shapes:
        base = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
        templ = ("blk.{bid}." + base.split(".", 2)[2]) if base.startswith("blk.") else base
        assert templ in known, name
    assert shapes["blk.0.ssm_conv1d_q.weight"] == [4, 1, 64, 1]
    assert shapes["blk.0.ssm_a"] == [1, 4, 1, 1]
    assert shapes["blk.3.attn_k_b.weight"] == [16, 32, 4] and shapes["blk.3.attn_v_b.weight"] == [32, 16, 4]
    assert shapes["blk.1.ffn_gate_exps.weight"] == [64, 32, 8] and shapes["blk.1.ffn_down_exps.weight"] == [32, 64, 8]
    assert shapes["blk.0.ffn_gate.weight"] == [64, 128] and shapes["token_embd.weight"] == [64, cfg.vocab_size]
    assert shapes["blk.0.ssm_f_b.weight"] == [16, 64] and shapes["blk.1.ffn_gate_inp.weight"] == [64, 8]
    # values: ssm_a = -exp(A_log); conv taps unchanged (tap fastest); k_b/v_b split of kv_b_proj
    idx = json.loads((tiny_dir / "model.safetensors.index.json").read_text())["weight_map"]

    def hf(name):
        with safe_open(str(tiny_dir / idx[name]), "pt") as f:
            return f.get_tensor(name).float()

    data = {t.name: torch.from_numpy(np.array(t.data)) for t in r.tensors}
    assert torch.equal(data["blk.0.ssm_a"].flatten(), -torch.exp(hf("model.layers.0.self_attn.A_log").flatten()))
    assert torch.equal(data["blk.0.ssm_conv1d_k.weight"].reshape(64, 4), hf("model.layers.0.self_attn.k_conv1d.weight")[:, 0])
    kv_b = hf("model.layers.3.self_attn.kv_b_proj.weight").view(4, 32, 32)  # [H, Dn + Dv, R]
    assert torch.equal(data["blk.3.attn_k_b.weight"], kv_b[:, :16].transpose(1, 2))
    assert torch.equal(data["blk.3.attn_v_b.weight"], kv_b[:, 16:])
    w2 = hf("model.layers.2.block_sparse_moe.experts.5.w2.weight")
    assert torch.equal(data["blk.2.ffn_down_exps.weight"][5], w2)


def test_real_config_has_610_tensors_and_fallbacks():
    shapes = canonical_shapes(KimiConfig())
    assert len(shapes) == 610  # spec 5.2
    r = get_recipe("Q4_K_M")
    assert r.qtype("blk.0.ssm_f_b.weight", shapes["blk.0.ssm_f_b.weight"]) == "Q8_0"  # rows of 128
    assert r.qtype("blk.3.attn_k_b.weight", shapes["blk.3.attn_k_b.weight"]) == "Q8_0"
    assert r.qtype("blk.3.attn_v_b.weight", shapes["blk.3.attn_v_b.weight"]) == "Q8_0"
    assert r.qtype("blk.1.ffn_down_exps.weight", shapes["blk.1.ffn_down_exps.weight"]) == "Q5_K"
    assert r.qtype("blk.1.ffn_up_exps.weight", shapes["blk.1.ffn_up_exps.weight"]) == "Q4_K"
    for n in ("blk.1.ffn_gate_inp.weight", "blk.1.exp_probs_b.bias", "blk.0.ssm_a", "blk.0.ssm_conv1d_q.weight",
              "blk.0.ssm_dt.bias", "blk.0.ssm_norm.weight", "output_norm.weight"):
        assert r.qtype(n, shapes[n]) == "F32"
    assert fallback_type("Q2_K", 2304) == "Q2_K" and fallback_type("Q6_K", 16) == "F16"
    assert fallback_type("Q8_0", 16) == "F16" and fallback_type("BF16", 3) == "BF16"


# ---- recipes, sizes, --fit -----------------------------------------------------------------------
def test_recipe_sizes_and_fit_on_the_real_config():
    cfg = KimiConfig()
    sizes = {n: weight_bytes(RECIPES[n], cfg) for n in RECIPES}
    order = list(reversed(FIT_ORDER))
    assert all(sizes[a] < sizes[b] for a, b in zip(order, order[1:]))
    assert sizes["BF16"] == pytest.approx(98_245_363_456, rel=1e-3)  # spec 7.2 (+ F32 router/norms)
    assert sizes["F32"] == 4 * 49_122_681_728
    assert 17e9 < sizes["Q2_K"] < 20e9 and 29e9 < sizes["Q4_K_M"] < 32e9
    assert fit(parse_size("24GB"), cfg, 131072)[0].name == "Q2_K"
    assert fit(parse_size("200GB"), cfg, 131072)[0].name == "BF16"
    assert fit(parse_size("48GB"), cfg, 131072)[0].name == "Q6_K"
    need = memory(sizes["Q2_K"], cfg, 131072).total
    assert fit(need, cfg, 131072)[0].name == "Q2_K"
    with pytest.raises(ModelError, match=r"too small.*smallest recipe \(Q2_K\) needs 21\.\d\d GB"):
        fit(need - 1, cfg, 131072)


def test_parse_size():
    assert parse_size("24GB") == 24 * 10**9 and parse_size("24GiB") == 24 * 2**30
    assert parse_size("22.5G") == 22_500_000_000 and parse_size("800MB") == 800 * 10**6
    assert parse_size("800 mib") == 800 * 2**20 and parse_size("123") == 123
    for bad in ("", "GB", "24XB", "-1GB", "1.2.3G"):
        with pytest.raises(ModelError, match="cannot read the size"):
            parse_size(bad)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ModelError, match="unknown recipe 'Q4_K_X'; valid recipes: Q2_K, Q3_K_M, Q4_K_M"):
        get_recipe("Q4_K_X")
    with pytest.raises(ModelError, match="unknown quant type 'Q7'; valid types: " + ", ".join(QUANT_TYPES)):
        uniform("Q7")
    with pytest.raises(ValueError, match="at most one"):
        choose_recipe(tiny_config(), quant="Q8_0", fit_budget="1GB")
    assert choose_recipe(tiny_config())[0].name == "Q4_K_M"
    assert choose_recipe(tiny_config(), recipe="q6_k")[0].name == "Q6_K"


# ---- atomic output ---------------------------------------------------------------------------------
def _fail_on_call(monkeypatch, n, exc):
    calls = {"n": 0}
    real = convert_mod.quantize

    def quantize_then_fail(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(convert_mod, "quantize", quantize_then_fail)


@pytest.mark.parametrize("exc,raised", [
    (KeyboardInterrupt(), KeyboardInterrupt),
    (OSError(errno.ENOSPC, "No space left on device"), ModelError),
    (RuntimeError("boom"), RuntimeError),
])
def test_interrupted_convert_leaves_nothing(tmp_path, tiny_dir, monkeypatch, exc, raised):
    _fail_on_call(monkeypatch, 20, exc)
    with pytest.raises(raised) as e:
        convert(tiny_dir, tmp_path / "out.gguf", get_recipe("Q8_0"), progress=False)
    if raised is ModelError:
        assert "disk full" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_disk_space_checked_first(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setattr(convert_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(ModelError, match="not enough free disk space"):
        convert(tiny_dir, tmp_path / "out.gguf", get_recipe("Q8_0"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path, tiny_dir):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(ModelError, match="already exists; pass --force"):
        convert(tiny_dir, out, get_recipe("F16"), progress=False)
    assert out.read_bytes() == b"keep me"
    convert(tiny_dir, out, get_recipe("F16"), progress=False, force=True)
    assert out.read_bytes()[:4] == b"GGUF" and list(tmp_path.iterdir()) == [out]


# ---- bad input ---------------------------------------------------------------------------------------
def test_bad_sources(tmp_path, tiny_dir):
    out = tmp_path / "out" / "x.gguf"
    out.parent.mkdir()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        convert(tmp_path / "empty", out, get_recipe("F16"), progress=False)
    with pytest.raises(ModelError, match="no such file"):
        convert(tmp_path / "missing", out, get_recipe("F16"), progress=False)
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="not a model directory"):
        convert(f, out, get_recipe("F16"), progress=False)
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelError, match="not a Kimi-Linear model"):
        convert(other, out, get_recipe("F16"), progress=False)
    broken = shutil.copytree(tiny_dir, tmp_path / "broken")
    shard = sorted(broken.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    with pytest.raises(ModelError, match="corrupt safetensors"):
        convert(broken, out, get_recipe("F16"), progress=False)
    shard.write_bytes(b"\xff" * 64)  # garbage header
    with pytest.raises(ModelError, match="corrupt safetensors"):
        convert(broken, out, get_recipe("F16"), progress=False)
    assert list(out.parent.iterdir()) == []


def test_cli_convert(tmp_path, tiny_dir):
    run = CliRunner().invoke
    out = tmp_path / "t.gguf"
    r = run(app, ["convert", str(tiny_dir), str(out), "--recipe", "Q4_K_M", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and out.is_file()
    r = run(app, ["convert", str(tiny_dir), str(out)])
    assert r.exit_code == 1 and "--force" in r.output
    r = run(app, ["convert", str(tiny_dir), str(tmp_path / "u.gguf"), "--fit", "1MB"])
    assert r.exit_code == 1 and "too small" in r.output and "smallest recipe (Q2_K) needs" in r.output
    r = run(app, ["convert", str(tiny_dir), str(tmp_path / "u.gguf"), "--fit", "1GB", "--ctx", "4096"])
    assert r.exit_code == 0 and "recipe BF16" in r.output
    r = run(app, ["convert", str(tiny_dir), str(tmp_path / "v.gguf"), "--recipe", "nope"])
    assert r.exit_code == 1 and "valid recipes" in r.output
    r = run(app, ["convert", str(tiny_dir), str(tmp_path / "v.gguf"), "--quant", "Q8_0", "--recipe", "Q2_K"])
    assert r.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf", "u.gguf"]
