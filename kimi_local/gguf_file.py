"""Reading `kimi-linear` GGUF files, ours or llama.cpp's (spec section 5), into the runtime.

`load_gguf_model(path, device, dtype)` -> LocalModel. Tensors come out as the canonical dict the
model consumes: F32/F16/BF16 as dense torch tensors, other types as `QTensor`s; on CPU both are
zero-copy views of gguf-py's memory map. Accepted llama.cpp variations: conv taps 3-D or 4-D,
`ssm_a` [1, H] or [1, H, 1, 1], any type per tensor, split files `NAME-00001-of-0000N.gguf`,
legacy unsplit `attn_kv_b`. Every problem is a one-line `ModelError`.
"""
from __future__ import annotations

import hashlib
import math
import re
import struct
import warnings
from dataclasses import dataclass
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


# ---- one file: GGUF v2/v3 header parser ---------------------------------------------------------------
# (gguf-py's GGUFReader takes minutes on the real 163,840-token vocabulary: it makes two numpy views per
# string; this parser reads the same layout with struct in well under a second.)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    ne: tuple[int, ...]  # ggml order, fastest dimension first
    offset: int  # absolute byte offset of the data in its file

    @property
    def shape(self) -> tuple[int, ...]:  # numpy order
        return tuple(reversed(self.ne))

    @property
    def type_name(self) -> str:
        try:
            return gguf.GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type{self.ggml_type}"

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES.get(self.ggml_type, (1, 0))
        return math.prod(self.ne) // block * size


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; running off the end means a truncated file."""

    def __init__(self, buf: memoryview, fname: str):
        self.buf, self.pos, self.fname = buf, 0, fname

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise ModelError(f"{self.fname}: corrupt or truncated GGUF file (the header needs byte {end:,}, "
                             f"the file has {len(self.buf):,})")
        out, self.pos = self.buf[self.pos : end], end
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        try:
            return str(self.take(self.scalar("<Q")), "utf-8")
        except UnicodeDecodeError:
            raise ModelError(f"{self.fname}: corrupt GGUF file (a string is not UTF-8)") from None

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype != _ARRAY:
            raise ModelError(f"{self.fname}: corrupt GGUF file (unknown value type {vtype})")
        etype, n = self.scalar("<I"), self.scalar("<Q")
        if etype in _SCALAR:
            fmt = _SCALAR[etype]
            return list(struct.unpack(f"<{n}{fmt[1]}", self.take(n * struct.calcsize(fmt))))
        if etype == _STRING:
            return self._strings(n)
        return [self.value(etype) for _ in range(n)]

    def _strings(self, n: int) -> list[str]:
        """n strings in a row (token lists, merges): the hot loop of reading a real model's header."""
        buf, pos, out = self.buf, self.pos, []
        try:
            for _ in range(n):
                (m,) = _U64.unpack_from(buf, pos)
                out.append(str(buf[pos + 8 : pos + 8 + m], "utf-8"))
                pos += 8 + m
        except struct.error:
            pos = len(buf) + 1
        except UnicodeDecodeError:
            raise ModelError(f"{self.fname}: corrupt GGUF file (a string is not UTF-8)") from None
        self.take(pos - self.pos)  # bounds check (a string cut off by the end of the file)
        return out


class GGUFFile:
    """One .gguf file, memory-mapped: `fields` (metadata dict) and `tensors` (name -> TensorInfo)."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise ModelError(f"{path}: no such file")
        self.path = path
        self.mm = np.memmap(path, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
        cur = _Cursor(memoryview(self.mm), path.name)
        if len(self.mm) < 4 or bytes(cur.take(4)) != b"GGUF":
            raise ModelError(f"{path.name}: not a GGUF file (bad magic)")
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ModelError(f"{path.name}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        self.fields = {}
        for _ in range(n_kv):
            key = cur.string()
            self.fields[key] = cur.value(cur.scalar("<I"))
        infos = [self._tensor_info(cur) for _ in range(n_tensors)]
        align = self.fields.get("general.alignment", 32)
        self.header_size = cur.pos
        self.data_start = -(-cur.pos // align) * align
        self.tensors = {}
        for name, ggml_type, ne, offset in infos:
            t = TensorInfo(name, ggml_type, ne, self.data_start + offset)
            if t.offset + t.nbytes > len(self.mm):
                raise ModelError(f"{path.name}: truncated GGUF file (tensor {name} ends at byte "
                                 f"{t.offset + t.nbytes:,}, the file has {len(self.mm):,})")
            self.tensors[name] = t

    @staticmethod
    def _tensor_info(cur: _Cursor):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if not 1 <= n_dims <= 4:
            raise ModelError(f"{cur.fname}: corrupt GGUF file (tensor {name!r} has {n_dims} dimensions)")
        ne = tuple(cur.scalar("<Q") for _ in range(n_dims))
        return name, cur.scalar("<I"), ne, cur.scalar("<Q")


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


def _f32_value(x) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.9999997e-06)."""
    return float(f"{float(x):.7g}")


class GGUFModelFile:
    """One kimi-linear GGUF (all splits): metadata of the first split, tensors of all of them."""

    def __init__(self, path):
        self.path = Path(path).expanduser()
        self.paths = split_paths(self.path)
        self.files = [GGUFFile(p) for p in self.paths]
        self.fields = self.files[0].fields
        arch = self.fields.get("general.architecture")
        if arch != ARCH:
            raise ModelError(f"{self.path.name}: GGUF architecture is {arch!r}; kimi-local runs only {ARCH!r}")
        self._check_splits()
        self.tensors = {name: (f, t) for f in self.files for name, t in f.tensors.items()}
        self.cfg = config_from_gguf(self.fields.get, self.path.name)

    def _check_splits(self) -> None:
        n = self.fields.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 1)
        if n != len(self.paths):
            raise ModelError(f"{self.path.name}: metadata says {n} split files, found {len(self.paths)}")
        want = self.fields.get(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
        have = sum(len(f.tensors) for f in self.files)
        if want is not None and want != have:
            raise ModelError(f"{self.path.name}: the splits hold {have} tensors, metadata says {want}")

    def fingerprint(self) -> str:
        """Hash of every split's header (metadata + tensor infos) and its size."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.mm[: f.header_size].tobytes())
            h.update(f"{f.path.name}:{len(f.mm)}".encode())
        return h.hexdigest()[:32]

    def raw(self, name: str) -> tuple[torch.Tensor, str, tuple[int, ...]]:
        """(uint8 bytes [*lead, row_bytes] viewing the file, qtype, numpy-order shape) of one tensor."""
        f, t = self.tensors[name]
        qtype = t.type_name
        if qtype not in QTYPES:
            raise ModelError(f"{self.path.name}: tensor {name} has type {qtype}, which kimi-local does not read "
                             f"(supported: {', '.join(QTYPES)})")
        q = QTYPES[qtype]
        if t.ne[0] % q.block_size:
            raise ModelError(f"{self.path.name}: tensor {name} rows of {t.ne[0]} values are not whole {qtype} blocks")
        with warnings.catch_warnings():  # read-only memory map: torch warns that it is not writable
            warnings.simplefilter("ignore", UserWarning)
            u8 = torch.from_numpy(f.mm[t.offset : t.offset + t.nbytes])
        return u8.view(*t.shape[:-1], t.ne[0] // q.block_size * q.type_size), qtype, t.shape


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
    if n_shared > 1:
        raise ModelError(f"{fname}: expert_shared_count {n_shared} is not supported (0 or 1)")
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
        num_shared_experts=n_shared,
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

    get = gf.fields.get
    model = get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelError(f"{gf.path.name}: tokenizer.ggml.model is {model!r}; expected 'gpt2' (Kimi tiktoken BPE)")
    try:
        return KimiTokenizer.from_gguf_fields(
            get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type"), get("tokenizer.ggml.merges"),
            get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id"),
            get("tokenizer.chat_template"), get("tokenizer.ggml.pre"),
        )
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ModelError(f"{gf.path.name}: unusable tokenizer metadata ({e})") from None


def load_gguf_model(path, device, dtype, **engine_opts):
    """A LocalModel from a GGUF file; engine_opts go to api.build_net (CUDA engine options)."""
    from kimi_local.api import LocalModel, build_net

    gf = GGUFModelFile(path)
    net = build_net(gf.cfg, load_weights(gf, dtype), torch.device(device), dtype, **engine_opts)
    return LocalModel(net, load_tokenizer(gf), gf.path, gf.fingerprint())
