"""`kimi-local info FILE`: what a GGUF file (or HF directory) holds and the memory it needs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from kimi_local.config import KimiConfig
from kimi_local.quant.recipe import GROUPS, GiB, memory, tensor_group


@dataclass
class Summary:
    path: Path
    kind: str  # "GGUF (kimi-linear)" or "HF safetensors"
    files: int
    cfg: KimiConfig
    n_tensors: int
    types: dict[str, tuple[int, int]]  # storage type -> (tensor count, bytes)
    groups: dict[str, int]  # tensor group -> bytes

    @property
    def weight_bytes(self) -> int:
        return sum(b for _, b in self.types.values())


def _add(types: dict, groups: dict, name: str, qtype: str, nbytes: int) -> None:
    n, b = types.get(qtype, (0, 0))
    types[qtype] = (n + 1, b + nbytes)
    groups[tensor_group(name)] += nbytes


def summarize_gguf(path) -> Summary:
    from kimi_local.gguf_file import GGUFModelFile

    gf = GGUFModelFile(path)
    types, groups = {}, dict.fromkeys(GROUPS, 0)
    for name, (_, t) in gf.tensors.items():
        _add(types, groups, name, t.type_name, t.nbytes)
    return Summary(gf.path, "GGUF (kimi-linear)", len(gf.paths), gf.cfg, len(gf.tensors), types, groups)


def summarize_hf(path) -> Summary:
    """From the safetensors headers only (no tensor is read); sizes grouped by canonical tensor."""
    from kimi_local.quant.hf_names import canonical_plan
    from kimi_local.weights import HFCheckpoint

    ck = HFCheckpoint(path)
    types, groups = {}, dict.fromkeys(GROUPS, 0)
    n = 0
    for name, srcs, _ in canonical_plan(ck.cfg):
        for s in srcs:
            info = ck.headers[ck.weight_map[s]][s]
            a, b = info["data_offsets"]
            _add(types, groups, name, info["dtype"], b - a)
            n += 1
    return Summary(ck.path, "HF safetensors", len(ck.headers), ck.cfg, n, types, groups)


def summarize(path) -> Summary:
    p = Path(path).expanduser()
    return summarize_hf(p) if p.is_dir() else summarize_gguf(p)


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f} GiB"


def render(s: Summary, ctxs: list[int]) -> list[Table]:
    """Overview, type histogram, size by group, memory at each context length."""
    cfg = s.cfg
    over = Table(title=f"{s.path.name}", show_header=False)
    over.add_row("format", f"{s.kind}, {s.files} file{'s' if s.files > 1 else ''}")
    over.add_row("architecture", "kimi-linear")
    over.add_row("layers", f"{cfg.num_hidden_layers} ({len(cfg.kda_layer_ids)} KDA, {len(cfg.mla_layer_ids)} MLA)")
    over.add_row("hidden / vocab", f"{cfg.hidden_size} / {cfg.vocab_size}")
    over.add_row("experts", f"{cfg.num_experts} routed (top {cfg.num_experts_per_token}) + {cfg.num_shared_experts} shared")
    over.add_row("tensors", f"{s.n_tensors}")
    over.add_row("weights", _gib(s.weight_bytes))

    types = Table(title="tensor types")
    for col in ("type", "tensors", "size"):
        types.add_column(col, justify="right" if col != "type" else "left")
    for q, (n, b) in sorted(s.types.items(), key=lambda kv: -kv[1][1]):
        types.add_row(q, str(n), _gib(b))

    groups = Table(title="size by group")
    groups.add_column("group")
    groups.add_column("size", justify="right")
    groups.add_column("share", justify="right")
    for g, b in s.groups.items():
        groups.add_row(g, _gib(b), f"{100 * b / max(1, s.weight_bytes):.1f} %")

    mem = Table(title="estimated memory (one sequence)")
    for col in ("context", "weights", "KDA state", "MLA cache", "workspace", "total"):
        mem.add_column(col, justify="right")
    for ctx in ctxs:
        m = memory(s.weight_bytes, cfg, ctx)
        mem.add_row(f"{ctx:,}", _gib(m.weights), _gib(m.state), _gib(m.cache), _gib(m.workspace), _gib(m.total))
    return [over, types, groups, mem]
