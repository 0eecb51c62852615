"""Reading `kimi-linear` GGUF files, ours or llama.cpp's (spec section 5), into the runtime.

`load_gguf_model(path, device, dtype)` -> LocalModel. Tensors come out as the canonical dict the
model consumes: F32/F16/BF16 as dense torch tensors, other types as `QTensor`s; on CPU both are
zero-copy views of gguf-py's memory map. Accepted llama.cpp variations: conv taps 3-D or 4-D,
`ssm_a` [1, H] or [1, H, 1, 1], any type per tensor, split files `NAME-00001-of-0000N.gguf`,
legacy unsplit `attn_kv_b`. Every problem is a one-line `ModelError`.
"""
from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

import gguf
import numpy as np
import torch

from kimi_local.config import KimiConfig, ModelError
from kimi_local.quant.formats import QTYPES, QTensor, dequantize
from kimi_local.quant.recipe import canonical_shapes, is_linear_weight

ARCH = "kimi-linear"
_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_FLOAT_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# ---- files -----------------------------------------------------------------------------------------
def split_paths(path: Path) -> list[Path]:
    """All files of a (possibly split) GGUF, in order. Any split of the set may be given."""
    m = _SPLIT_RE.match(path.name)
    if not m:
        return [path]
    n = int(m["count"])
    paths = [path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    for p in paths:
        if not p.is_file():
            raise ModelError(f"{path.name} is split {m['no']} of {n}, but {p.name} is missing")
    return paths


def _open_reader(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path.name}: not a GGUF file (bad magic)")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError, IndexError, struct/numpy errors on bad bytes
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ModelError(f"{path.name}: corrupt or truncated GGUF file ({detail})") from None


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.get_field(key)
    return default if f is None else f.contents()


def _f32_value(x) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.9999997e-06)."""
    return float(f"{float(x):.7g}")


class GGUFModelFile:
    """One kimi-linear GGUF (all splits): metadata of the first split, tensors of all of them."""

    def __init__(self, path):
        self.path = Path(path).expanduser()
        self.paths = split_paths(self.path)
        self.readers = [_open_reader(p) for p in self.paths]
        first = self.readers[0]
        arch = _field(first, "general.architecture")
        if arch != ARCH:
            raise ModelError(f"{self.path.name}: GGUF architecture is {arch!r}; kimi-local runs only {ARCH!r}")
        self._check_splits()
        self.tensors = {t.name: (r, t) for r in self.readers for t in r.tensors}
        self.cfg = config_from_gguf(lambda k, d=None: _field(first, k, d), self.path.name)

    def _check_splits(self) -> None:
        n = _field(self.readers[0], gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 1)
        if n != len(self.paths):
            raise ModelError(f"{self.path.name}: metadata says {n} split files, found {len(self.paths)}")
        want = _field(self.readers[0], gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
        have = sum(len(r.tensors) for r in self.readers)
        if want is not None and want != have:
            raise ModelError(f"{self.path.name}: the splits hold {have} tensors, metadata says {want}")

    def get(self, key: str, default=None):
        return _field(self.readers[0], key, default)

    def fingerprint(self) -> str:
        """Hash of every split's header (metadata + tensor infos) and its size."""
        h = hashlib.sha256()
        for p, r in zip(self.paths, self.readers):
            h.update(r.data[: r.data_offset].tobytes())
            h.update(f"{p.name}:{p.stat().st_size}".encode())
        return h.hexdigest()[:32]

    def tensor_qtype(self, name: str) -> str:
        _, t = self.tensors[name]
        q = gguf.GGMLQuantizationType(t.tensor_type).name
        if q not in QTYPES:
            raise ModelError(f"{self.path.name}: tensor {name} has type {q}, which kimi-local does not read "
                             f"(supported: {', '.join(QTYPES)})")
        return q

    def raw(self, name: str) -> tuple[torch.Tensor, str, tuple[int, ...]]:
        """(uint8 bytes [*lead, row_bytes] viewing the file, qtype, numpy-order shape) of one tensor."""
        reader, t = self.tensors[name]
        qtype = self.tensor_qtype(name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        q = QTYPES[qtype]
        if shape[-1] % q.block_size:
            raise ModelError(f"{self.path.name}: tensor {name} rows of {shape[-1]} values are not whole "
                             f"{qtype} blocks")
        row = shape[-1] // q.block_size * q.type_size
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * row
        data = reader.data[t.data_offset : t.data_offset + nbytes]
        if data.size != nbytes:
            raise ModelError(f"{self.path.name}: truncated GGUF file (tensor {name} ends past the end of the file)")
        with warnings.catch_warnings():  # read-only memory map: torch warns that it is not writable
            warnings.simplefilter("ignore", UserWarning)
            u8 = torch.from_numpy(data)
        return u8.view(*shape[:-1], row), qtype, shape


# ---- metadata -> config ----------------------------------------------------------------------------
def config_from_gguf(get, fname: str) -> KimiConfig:
    """KimiConfig from kimi-linear metadata. `get(key, default)` reads one key."""
    a = ARCH + "."

    def need(key):
        v = get(a + key)
        if v is None:
            raise ModelError(f"{fname}: GGUF metadata lacks {a + key}")
        return v

    n_layers = need("block_count")
    hkv = need("attention.head_count_kv")
    if not isinstance(hkv, list) or len(hkv) != n_layers:
        raise ModelError(f"{fname}: {a}attention.head_count_kv must be an array with one entry per layer "
                         "(0 = KDA, 1 = MLA)")
    gating = get(a + "expert_gating_func", 2)
    if gating != gguf.ExpertGatingFuncType.SIGMOID:
        raise ModelError(f"{fname}: expert_gating_func {gating} is not supported (Kimi-Linear uses 2, sigmoid)")
    rope = need("rope.dimension_count")
    kv_rank = need("attention.kv_lora_rank")
    heads = need("attention.head_count")
    n_shared = get(a + "expert_shared_count", 0)
    tokens = get("tokenizer.ggml.tokens") or []
    im_end = tokens.index("<|im_end|>") if "<|im_end|>" in tokens else None
    cfg = KimiConfig(
        vocab_size=get(a + "vocab_size") or len(tokens) or need("vocab_size"),
        hidden_size=need("embedding_length"),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        intermediate_size=need("feed_forward_length"),
        rms_norm_eps=_f32_value(need("attention.layer_norm_rms_epsilon")),
        kv_lora_rank=kv_rank,
        qk_nope_head_dim=need("attention.key_length_mla") - rope,
        qk_rope_head_dim=rope,
        v_head_dim=need("attention.value_length_mla"),
        num_experts=need("expert_count"),
        num_experts_per_token=need("expert_used_count"),
        num_shared_experts=min(n_shared, 1),
        moe_intermediate_size=need("expert_feed_forward_length"),
        routed_scaling_factor=_f32_value(get(a + "expert_weights_scale", 1.0)),
        first_k_dense_replace=get(a + "leading_dense_block_count", 0),
        kda_layers=[i + 1 for i in range(n_layers) if hkv[i] == 0],
        full_attn_layers=[i + 1 for i in range(n_layers) if hkv[i] != 0],
        kda_num_heads=heads,  # one n_head serves KDA and MLA in llama.cpp (spec 10)
        kda_head_dim=need("kda.head_dim"),
        conv_size=need("ssm.conv_kernel"),
        bos_token_id=get("tokenizer.ggml.bos_token_id", 0),
        eos_token_id=im_end if im_end is not None else get("tokenizer.ggml.eos_token_id", 0),
        pad_token_id=get("tokenizer.ggml.padding_token_id", 0),
        model_max_length=need("context_length"),
    )
    if n_shared > 1:
        raise ModelError(f"{fname}: expert_shared_count {n_shared} is not supported (0 or 1)")
    cfg.validate()
    return cfg


# ---- tensors -> canonical dict ---------------------------------------------------------------------
def _canonical_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Undo the GGUF-only shapes: conv taps (1, P, 1, W) / (P, 1, W) / (P, W) -> [P, W]; ssm_a -> [H]."""
    if ".ssm_conv1d_" in name:
        return (int(np.prod(shape)) // shape[-1], shape[-1])
    if name.endswith(".ssm_a"):
        return (int(np.prod(shape)),)
    return shape


def _dense(u8: torch.Tensor, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Values of a tensor as a torch tensor: a zero-copy view for float types, else dequantized fp32."""
    if qtype in _FLOAT_TORCH:
        return u8.view(_FLOAT_TORCH[qtype]).reshape(shape)
    return dequantize(u8, qtype, shape[-1]).reshape(shape)


def _split_kv_b(kv_b: torch.Tensor, cfg: KimiConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Legacy unsplit attn_kv_b [H * (Dn + Dv), R] -> attn_k_b [H, R, Dn], attn_v_b [H, Dv, R]."""
    w = kv_b.float().reshape(cfg.num_attention_heads, -1, cfg.kv_lora_rank)
    Dn = cfg.qk_nope_head_dim
    return w[:, :Dn, :].transpose(1, 2).contiguous(), w[:, Dn:, :].contiguous()


def _place(name: str, t, dtype: torch.dtype):
    """Linear weights keep their stored type (QTensor, or a dense float tensor that stays a zero-copy
    view of the file; ops cast per call); the other tensors are small: fp32 for decay parameters and
    the router, else the compute dtype. Everything stays on the CPU: build_net moves what it needs."""
    from kimi_local.weights import is_f32_tensor

    if is_linear_weight(name):
        return t
    return t.to(torch.float32 if is_f32_tensor(name) else dtype)


def load_weights(gf: GGUFModelFile, dtype: torch.dtype) -> dict:
    """Canonical name -> tensor / QTensor (on the CPU) for the model, after checking names and shapes."""
    cfg, out = gf.cfg, {}
    for name in gf.tensors:
        u8, qtype, shape = gf.raw(name)
        if name.endswith("attn_kv_b.weight"):
            k_b, v_b = _split_kv_b(_dense(u8, qtype, shape), cfg)
            base = name[: -len("attn_kv_b.weight")]
            out.setdefault(base + "attn_k_b.weight", k_b)
            out.setdefault(base + "attn_v_b.weight", v_b)
            continue
        shape = _canonical_shape(name, shape)
        if qtype in _FLOAT_TORCH or not is_linear_weight(name):
            out[name] = _dense(u8, qtype, shape)
        else:
            out[name] = QTensor(u8, qtype, shape)
    if "output.weight" not in out and "token_embd.weight" in out:
        out["output.weight"] = out["token_embd.weight"]  # tied embeddings
    want = canonical_shapes(cfg)
    for name, shape in want.items():
        if name not in out:
            raise ModelError(f"{gf.path.name}: missing tensor {name}")
        if tuple(out[name].shape) != shape:
            raise ModelError(f"{gf.path.name}: tensor {name} has shape {list(out[name].shape)}, "
                             f"expected {list(shape)}")
    return {name: _place(name, out[name], dtype) for name in want}


def load_tokenizer(gf: GGUFModelFile):
    from kimi_local.tokenizer import KimiTokenizer

    model = gf.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelError(f"{gf.path.name}: tokenizer.ggml.model is {model!r}; expected 'gpt2' (Kimi tiktoken BPE)")
    try:
        return KimiTokenizer.from_gguf_fields(
            gf.get("tokenizer.ggml.tokens"), gf.get("tokenizer.ggml.token_type"), gf.get("tokenizer.ggml.merges"),
            gf.get("tokenizer.ggml.bos_token_id"), gf.get("tokenizer.ggml.eos_token_id"),
            gf.get("tokenizer.chat_template"), gf.get("tokenizer.ggml.pre"),
        )
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ModelError(f"{gf.path.name}: unusable tokenizer metadata ({e})") from None


def load_gguf_model(path, device, dtype, **engine_opts):
    """A LocalModel from a GGUF file; engine_opts go to api.build_net (CUDA engine options)."""
    from kimi_local.api import LocalModel, build_net

    gf = GGUFModelFile(path)
    net = build_net(gf.cfg, load_weights(gf, dtype), torch.device(device), dtype, **engine_opts)
    return LocalModel(net, load_tokenizer(gf), gf.path, gf.fingerprint())
