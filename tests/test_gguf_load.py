"""Loading kimi-linear GGUFs: ours, llama.cpp's variations (rewritten with gguf-py), bad files,
tokenizer from metadata, `kimi-local info`, and (opt-in) llama.cpp on our file."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from kquant_model import rel_rmse
from typer.testing import CliRunner

import kimi_local
from kimi_local.cli import app
from kimi_local.config import ModelError
from kimi_local.gguf_file import GGUFFile, GGUFModelFile, load_weights
from kimi_local.info import render, summarize
from kimi_local.model import KimiLinear
from kimi_local.quant.convert import convert
from kimi_local.quant.formats import QTYPES, QTensor, dequantize, quantize
from kimi_local.quant.recipe import get_recipe
from kimi_local.tokenizer import KimiTokenizer
from kimi_local.weights import HFCheckpoint

IDS = list(range(1, 40)) + [512, 600, 700]


@pytest.fixture(scope="module")
def ours(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("ours")
    for r in ("F32", "Q8_0"):
        convert(tiny_dir, d / f"{r}.gguf", get_recipe(r), progress=False)
    return d


@pytest.fixture(scope="module")
def hf_logits(tiny_dir):
    return kimi_local.load(tiny_dir, device="cpu").logits(IDS)


# ---- rewriting a GGUF the way llama.cpp's tools lay it out ---------------------------------------------
def _values(t) -> np.ndarray:
    """float32 values of a reader tensor in numpy (GGUF) shape."""
    shape = tuple(reversed(t.shape.tolist()))
    q = t.tensor_type.name
    raw = torch.from_numpy(np.array(t.data).reshape(-1).view(np.uint8))
    n = shape[-1]
    return dequantize(raw.view(-1, raw.numel() // int(np.prod(shape[:-1]))), q, n).reshape(shape).numpy()


def rewrite(src, dst, arch="kimi-linear", conv3d=False, ssm_a_2d=False, kv_b=False, types=None, split=0,
            drop=()):
    """Copy a GGUF with gguf-py, changing layouts: conv taps 3-D (P, 1, W), ssm_a (H, 1) i.e. ggml [1, H],
    legacy unsplit attn_kv_b, other ggml types per tensor, split files of `split` tensors."""
    r = GGUFReader(src)
    w = GGUFWriter(dst, arch, split_max_tensors=split)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        key = key.replace("kimi-linear.", arch + ".")
        if f.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), GGUFValueType.ARRAY, sub_type=f.types[-1])
        else:
            w.add_key_value(key, f.contents(), f.types[0])
    tensors = {t.name: _values(t) for t in r.tensors if t.name not in drop}
    if kv_b:
        for name in [n for n in tensors if n.endswith("attn_k_b.weight")]:
            k_b, v_b = tensors.pop(name), tensors.pop(name.replace("k_b", "v_b"))  # [H, R, Dn], [H, Dv, R]
            kv = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)  # [H, Dn + Dv, R]
            tensors[name.replace("k_b", "kv_b")] = kv.reshape(-1, kv.shape[-1])
    for name, v in tensors.items():
        if conv3d and ".ssm_conv1d_" in name:
            v = v.reshape(v.shape[1], 1, v.shape[3])
        if ssm_a_2d and name.endswith("ssm_a"):
            v = v.reshape(-1, 1)
        q = (types or {}).get(name, "F32")
        if q == "F32":
            w.add_tensor(name, np.ascontiguousarray(v, dtype=np.float32))
        else:
            data = quantize(torch.from_numpy(v.copy()), q).numpy()
            w.add_tensor(name, data, raw_dtype=GGMLQuantizationType(QTYPES[q].ggml_id))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_llama_cpp_layout_variations_load(tmp_path, ours, hf_logits):
    dst = tmp_path / "var.gguf"
    rewrite(ours / "F32.gguf", dst, conv3d=True, ssm_a_2d=True, kv_b=True, split=50)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["var-00001-of-00003.gguf", "var-00002-of-00003.gguf", "var-00003-of-00003.gguf"]
    r = GGUFReader(tmp_path / files[0])
    assert r.fields["split.count"].contents() == 3 and r.fields["split.tensors.count"].contents() == 128
    shapes = {t.name: t.shape.tolist() for t in r.tensors}
    assert shapes["blk.0.ssm_conv1d_q.weight"] == [4, 1, 64] and shapes["blk.0.ssm_a"] == [1, 4]
    for name in (files[0], files[1]):  # any split of the set may be given
        m = kimi_local.load(tmp_path / name, device="cpu")
        assert rel_rmse(m.logits(IDS), hf_logits) < 1e-6
    assert m.cfg == kimi_local.load(ours / "F32.gguf", device="cpu").cfg
    (tmp_path / files[2]).unlink()
    with pytest.raises(ModelError, match="var-00003-of-00003.gguf is missing"):
        kimi_local.load(tmp_path / files[0], device="cpu")


def test_mixed_types_per_tensor(tmp_path, ours, tiny_dir):
    """BF16 embeddings, F16 head and router, Q8_0 experts / attention / v_b: equal to the checkpoint
    with exactly those roundings applied (the loader adds no error of its own)."""
    types = {"token_embd.weight": "BF16", "output.weight": "F16", "blk.1.ffn_gate_inp.weight": "F16",
             "blk.1.ffn_gate_exps.weight": "Q8_0", "blk.2.ffn_down_exps.weight": "Q8_0",
             "blk.0.attn_q.weight": "Q8_0", "blk.3.attn_v_b.weight": "Q8_0", "blk.5.attn_output.weight": "Q8_0"}
    rewrite(ours / "F32.gguf", tmp_path / "mixed.gguf", types=types)
    m = kimi_local.load(tmp_path / "mixed.gguf", device="cpu")
    assert isinstance(m.net.w["blk.1.ffn_gate_exps.weight"], QTensor)
    assert m.net.w["blk.1.ffn_gate_inp.weight"].dtype == torch.float32
    w = {}
    for name, t in HFCheckpoint(tiny_dir).iter_canonical():
        t = t.float()
        q = types.get(name)
        w[name] = dequantize(quantize(t, q), q, t.shape[-1]).reshape(t.shape) if q else t
    net = KimiLinear(m.cfg, w)
    want = net.forward(torch.tensor(IDS), net.new_cache(), "all")
    torch.testing.assert_close(m.logits(IDS), want, rtol=1e-5, atol=1e-5)


def test_quantized_weights_are_views_of_the_file(ours):
    gf = GGUFModelFile(ours / "Q8_0.gguf")
    w = load_weights(gf, torch.float32)
    mm = gf.files[0].mm
    lo, hi = mm.ctypes.data, mm.ctypes.data + mm.size
    for name in ("blk.1.ffn_up_exps.weight", "token_embd.weight", "blk.0.attn_q.weight"):
        assert isinstance(w[name], QTensor) and lo <= w[name].data.data_ptr() < hi, name
    assert isinstance(w["blk.0.ssm_f_b.weight"], torch.Tensor)  # F16 fallback: dense view
    assert lo <= w["blk.0.ssm_f_b.weight"].data_ptr() < hi


# ---- bad files -------------------------------------------------------------------------------------------
def _one_line_error(path, match):
    with pytest.raises(ModelError, match=match) as e:
        kimi_local.load(path, device="cpu")
    assert "\n" not in str(e.value)


def test_bad_gguf_files(tmp_path, ours):
    good = (ours / "F32.gguf").read_bytes()
    header = GGUFFile(ours / "F32.gguf").header_size
    cuts = {"metadata": 200, "token list": header // 3, "tensor infos": header - 5, "data": len(good) // 2}
    for n, cut in cuts.items():
        p = tmp_path / f"{n}.gguf"
        p.write_bytes(good[:cut])
        _one_line_error(p, "truncated")
    p = tmp_path / "garbage.gguf"
    p.write_bytes(good[:8] + bytes(range(256)) * 64)
    _one_line_error(p, "corrupt or truncated GGUF")
    p = tmp_path / "text.gguf"
    p.write_text("hello")
    _one_line_error(p, "not a GGUF file")
    _one_line_error(tmp_path / "nope.gguf", "no such file")
    rewrite(ours / "F32.gguf", tmp_path / "llama.gguf", arch="llama")
    _one_line_error(tmp_path / "llama.gguf", "architecture is 'llama'; kimi-local runs only 'kimi-linear'")
    rewrite(ours / "F32.gguf", tmp_path / "short.gguf", drop=("blk.2.ssm_beta.weight",))
    _one_line_error(tmp_path / "short.gguf", "missing tensor blk.2.ssm_beta.weight")


# ---- tokenizer, fingerprint ------------------------------------------------------------------------------
def test_tokenizer_and_template_from_metadata(ours, tiny_dir):
    a = kimi_local.load(ours / "Q8_0.gguf", device="cpu").tokenizer
    b = KimiTokenizer.from_dir(tiny_dir)
    text = "Hello, world! Kimi's linear attention: 123 456\n\ttabs <|im_end|> and unicode é"
    assert a.encode(text) == b.encode(text)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi <|im_end|>"}]
    assert a.encode_chat(msgs) == b.encode_chat(msgs)
    assert a.chat_template == b.chat_template and a.stop_ids == b.stop_ids and a.bos_id == b.bos_id


def test_fingerprint(ours, tmp_path):
    f1 = kimi_local.load(ours / "F32.gguf", device="cpu").fingerprint
    assert f1 == GGUFModelFile(ours / "F32.gguf").fingerprint()
    assert f1 != GGUFModelFile(ours / "Q8_0.gguf").fingerprint()


# ---- info --------------------------------------------------------------------------------------------------
def test_info(ours, tiny_dir):
    s = summarize(ours / "Q8_0.gguf")
    assert s.n_tensors == 130 and set(s.types) == {"Q8_0", "F32", "F16"}
    assert sum(s.groups.values()) == s.weight_bytes == sum(b for _, b in s.types.values())
    assert s.groups["routed experts"] > s.groups["shared experts"] > 0
    tables = render(s, [4096, 131072])
    assert len(tables) == 4 and tables[3].row_count == 2
    h = summarize(tiny_dir)
    assert h.types["BF16"][0] + h.types["F32"][0] == h.n_tensors
    r = CliRunner().invoke(app, ["info", str(ours / "Q8_0.gguf"), "--ctx", "1000"])
    assert r.exit_code == 0 and "kimi-linear" in r.output and "routed experts" in r.output and "1,000" in r.output
    r = CliRunner().invoke(app, ["info", str(tiny_dir)])
    assert r.exit_code == 0 and "1,048,576" in r.output
    r = CliRunner().invoke(app, ["info", str(tiny_dir / "config.json")])
    assert r.exit_code == 1 and "not a GGUF file" in r.output


# ---- llama.cpp as an oracle (opt-in) ------------------------------------------------------------------
@pytest.mark.llama
def test_llama_cpp_loads_our_gguf_and_logits_match(ours, hf_logits):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(ours / "F32.gguf"), n_ctx=128, n_batch=64, logits_all=True,
                          type_k=0, type_v=0, flash_attn=False, verbose=False)  # F32 KV cache (spec 10)
    llm.eval(IDS)
    theirs = torch.tensor(np.array(llm.scores[: len(IDS)]), dtype=torch.float32)
    assert rel_rmse(theirs, hf_logits) < 1e-4  # spec 10 measured ~3e-6


def _bench(args):
    r = subprocess.run([sys.executable, "-m", "kimi_local.cli", "bench", *args], capture_output=True, timeout=600)
    return r.returncode, r.stdout.decode(), r.stderr.decode()


def test_bench_llama_cpp_needs_a_gguf(tiny_dir):
    code, _, err = _bench([str(tiny_dir), "--device", "cpu", "--llama-cpp"])
    assert code == 2 and "--llama-cpp times llama.cpp on the same file" in err


@pytest.mark.llama
def test_bench_llama_cpp_baseline(ours):
    """`bench MODEL.gguf --llama-cpp`: llama.cpp's rows for the same depths and prompts, and our ratio."""
    pytest.importorskip("llama_cpp")
    code, out, err = _bench([str(ours / "Q8_0.gguf"), "--device", "cpu", "--contexts", "16,40", "--prompts", "24",
                             "--decode-tokens", "3", "--chunk", "8", "--llama-cpp", "--json"])
    assert code == 0, err
    res = json.loads(out)
    theirs = {(r["kind"], r["ctx"]): r for r in res["rows"] if r.get("note") == "llama.cpp"}
    assert set(theirs) == {("decode", 16), ("decode", 40), ("prefill", 24)}
    assert all(r["tok_s"] > 0 for r in theirs.values()) and res["info"]["gpu_offload"] in (True, False)
    mine = [r for r in res["rows"] if r.get("note") != "llama.cpp"]
    assert len(mine) == 3
    for r in mine:
        assert r["x_llama_cpp"] == round(r["tok_s"] / theirs[(r["kind"], r["ctx"])]["tok_s"], 2)
