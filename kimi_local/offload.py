"""Expert offloading: run a model whose routed experts do not fit the VRAM budget (DESIGN decision 6).

Everything but the routed experts stays resident. The experts of MoE layer L live in a host store
(pinned memory when CUDA is available) and in a per-layer device pool of S_L slots:

    host store  [E, rows, row_bytes] uint8 (or dense [E, rows, cols]) per projection, per layer
        │  miss: copy the expert's 3 blocks on a side CUDA stream (events order it both ways)
        ▼
    slot pool   [S_L, rows, row_bytes] per projection, per layer  ──► MoE kernels read pool[slot]

`OffloadedExperts` has `ResidentExperts`' interface: `prepare(layer, ids, h) -> slots` makes the
chosen experts resident and returns their slots; `pools(layer)` returns the pools. Inside
`prepare(L)` it also guesses layer L+1's experts by applying L+1's router to the current hidden
state and starts their copies (prefetch), so they overlap with layer L's compute.

Two places decide hits and victims (`apply_offload(loader=...)`):
  device (default with the GPU engine and a pinned store): the tables live in device memory and a decode
      token's decisions, miss copies (a kernel reading the pinned host store over PCIe) and the next
      layer's prefetch all run inside the decode CUDA graph (kernels/expert_cache.py): no host sync per
      layer. Measured 7x naive load-on-miss (docs/perf-notes.md, session 2); prefill chunks still decide
      on the host, pulling the tables before and pushing them after (one sync per layer per chunk).
  host: every step decides on the host (one sync per MoE layer; no decode graph): the reference model on
      CPU, and the baseline the device loader was measured against.

A prefill chunk whose union of experts exceeds S_L goes through a shared staging pool of E slots
(resident experts copied device-to-device, the rest from the host): each needed expert crosses the
bus once per chunk. On CPU the same placement, pools and copies run with plain `copy_` (an
emulated budget), which is how CI forces offloading on the tiny model.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kimi_local.config import KimiConfig, ModelError
from kimi_local.quant.formats import QTensor
from kimi_local.quant.recipe import fmt_bytes, parse_size, workspace_bytes  # noqa: F401  (parse_size re-exported)

PROJ = ("gate", "up", "down")
PROFILE_FORMAT = "kimi-local-expert-profile"


class OffloadError(ModelError):
    """The budget cannot hold the model even with offloading; the message names flags that would fit."""


# ---- byte accounting ---------------------------------------------------------------------------
def _tensors_of(obj):
    """Every torch.Tensor reachable through tensors, QTensors / GPU weights (.data / .dense),
    tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors_of(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors_of(o)
    else:
        for name in ("data", "dense"):
            t = getattr(obj, name, None)
            if isinstance(t, torch.Tensor):
                yield t


def resident_bytes(weights: dict) -> int:
    """Bytes of the (non-expert) weights, each storage counted once."""
    seen, total = set(), 0
    for name, w in weights.items():
        if "_exps." in name:
            continue
        for t in _tensors_of(w):
            if t.device.type == "cpu" and t.is_pinned():  # kept in host memory (e.g. the embedding table)
                continue
            key = (t.device, t.data_ptr(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def _raw(block) -> torch.Tensor:
    """The storage of one expert stack: QTensor rows uint8 [E, rows, row_bytes] or a dense tensor."""
    return block.data if isinstance(block, QTensor) else block


def _wrap(like, raw: torch.Tensor):
    """`raw` ([S, ...] storage) in the form of `like` (a QTensor or a plain tensor)."""
    if isinstance(like, QTensor):
        return QTensor(raw, like.qtype, (raw.shape[0], *like.shape[1:]))
    return raw


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---- placement ---------------------------------------------------------------------------------
@dataclass
class Placement:
    """How a VRAM budget is spent. All sizes in bytes; slots and expert_bytes per MoE layer."""

    vram: int
    ctx: int
    weights: int  # resident (non-expert) weights
    state: int  # KDA recurrent state + conv tails
    kv_cache: int  # MLA latent cache for ctx tokens
    workspace: int  # CUDA context, kernel workspaces, prefill activations (quant.recipe estimate)
    staging: int  # prefill staging pool (E experts), only when some layer cannot hold all E
    expert_bytes: dict[int, int]  # bytes of one expert (gate + up + down) per layer
    slots: dict[int, int]
    num_experts: int

    @property
    def reserved(self) -> int:
        return self.weights + self.state + self.kv_cache + self.workspace + self.staging

    @property
    def pool_bytes(self) -> int:
        return sum(self.slots[L] * self.expert_bytes[L] for L in self.slots)

    @property
    def all_resident(self) -> bool:
        return all(s >= self.num_experts for s in self.slots.values())

    def describe(self) -> str:
        s = sorted(self.slots.values())
        per = f"{s[0]}" if s[0] == s[-1] else f"{s[0]}..{s[-1]}"
        return (f"--vram {fmt_bytes(self.vram)}: weights {fmt_bytes(self.weights)}, state+cache "
                f"{fmt_bytes(self.state + self.kv_cache)} (ctx {self.ctx}), workspace {fmt_bytes(self.workspace)}"
                f"{f', staging {fmt_bytes(self.staging)}' if self.staging else ''}; expert pools "
                f"{fmt_bytes(self.pool_bytes)} = {per} of {self.num_experts} experts per layer")


def kv_cache_bytes(cfg: KimiConfig, ctx: int, kv_bytes_per_value: float = 2.0) -> int:
    """MLA latent cache for ctx tokens (fp8 adds one fp32 scale per row)."""
    per_tok = cfg.mla_bytes_per_token(kv_bytes_per_value)
    if kv_bytes_per_value < 2:
        per_tok += 4 * len(cfg.mla_layer_ids)
    return ctx * per_tok


def allocate_slots(free: int, expert_bytes: dict[int, int], k: int, E: int,
                   popularity: dict[int, torch.Tensor] | None = None) -> dict[int, int] | None:
    """Slots per layer: k each, then one at a time to the layer whose next-most-popular expert is the
    most popular (a slot for expert e saves p_e x its bytes of traffic per token and costs its bytes,
    so the gain per byte is p_e); ties go to the layer with the fewest slots (uniform -> even split).
    popularity[L]: [E] routing frequencies (None = uniform). None if even k per layer does not fit."""
    layers = sorted(expert_bytes)
    slots = {L: min(k, E) for L in layers}
    free -= sum(slots[L] * expert_bytes[L] for L in layers)
    if free < 0:
        return None
    ranked = {}
    for L in layers:
        p = popularity.get(L) if popularity else None
        p = torch.full((E,), 1.0 / E) if p is None or float(p.sum()) <= 0 else p.double() / float(p.sum())
        ranked[L] = torch.sort(p, descending=True).values.tolist()
    while True:
        best = None
        for L in layers:
            s = slots[L]
            if s < E and expert_bytes[L] <= free:
                key = (ranked[L][s], -s, -L)
                if best is None or key > best[0]:
                    best = (key, L)
        if best is None:
            return slots
        L = best[1]
        slots[L] += 1
        free -= expert_bytes[L]


def plan_placement(cfg: KimiConfig, vram: int, ctx: int, weights_bytes: int, expert_bytes: dict[int, int] | int,
                   kv_bytes_per_value: float = 2.0, popularity: dict[int, torch.Tensor] | None = None,
                   workspace: int | None = None) -> Placement:
    """Spend `vram`: resident weights, KDA state, MLA cache for ctx, workspace first; the rest becomes
    expert slots. Raises OffloadError (naming flags that would fit) when < top_k slots per layer fit."""
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)]
    if isinstance(expert_bytes, int):
        expert_bytes = {L: expert_bytes for L in moe_layers}
    E, k = cfg.num_experts, cfg.num_experts_per_token
    ws = workspace_bytes(cfg) if workspace is None else workspace

    def build(ctx_, kvb):
        kv = kv_cache_bytes(cfg, ctx_, kvb)
        fixed = weights_bytes + cfg.kda_state_bytes() + kv + ws
        all_in = sum(E * b for b in expert_bytes.values())
        staging = 0 if fixed + all_in <= vram else E * max(expert_bytes.values())
        slots = allocate_slots(vram - fixed - staging, expert_bytes, k, E, popularity)
        return Placement(vram, ctx_, weights_bytes, cfg.kda_state_bytes(), kv, ws, staging,
                         dict(expert_bytes), slots or {}, E), slots is not None

    plan, ok = build(ctx, kv_bytes_per_value)
    if ok:
        return plan
    need = plan.reserved + sum(k * b for b in expert_bytes.values())
    hints = []
    per_tok = kv_cache_bytes(cfg, 1, kv_bytes_per_value)
    spare = vram - (need - plan.kv_cache)
    if spare >= per_tok * 256:
        hints.append(f"--ctx {spare // per_tok} or less")
    if kv_bytes_per_value >= 2 and build(ctx, 1)[1]:
        hints.append("--kv-cache fp8")
    hints.append("a smaller recipe (convert with --fit, or a lower-bit GGUF)")
    raise OffloadError(
        f"--vram {fmt_bytes(vram)} is too small at --ctx {ctx}: weights {fmt_bytes(plan.weights)} + state "
        f"{fmt_bytes(plan.state)} + MLA cache {fmt_bytes(plan.kv_cache)} + workspace {fmt_bytes(plan.workspace)} "
        f"+ prefill staging {fmt_bytes(plan.staging)} + {k} expert slots per layer "
        f"({fmt_bytes(sum(k * b for b in expert_bytes.values()))}) need {fmt_bytes(need)}; "
        f"would fit with: {'; '.join(hints)}")


def vram_for_slots(cfg: KimiConfig, ctx: int, weights_bytes: int, expert_bytes: dict[int, int] | int,
                   n: int, kv_bytes_per_value: float = 2.0, workspace: int | None = None) -> int:
    """The smallest budget that gives n slots in every MoE layer (tests, benchmarks)."""
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)]
    if isinstance(expert_bytes, int):
        expert_bytes = {L: expert_bytes for L in moe_layers}
    ws = workspace_bytes(cfg) if workspace is None else workspace
    fixed = weights_bytes + cfg.kda_state_bytes() + kv_cache_bytes(cfg, ctx, kv_bytes_per_value) + ws
    staging = 0 if n >= cfg.num_experts else cfg.num_experts * max(expert_bytes.values())
    return fixed + staging + sum(min(n, cfg.num_experts) * b for b in expert_bytes.values())


# ---- expert popularity profiles ----------------------------------------------------------------
def load_profile(path: Path, cfg: KimiConfig) -> dict[int, torch.Tensor]:
    """Per-layer routing counts [E] (float64) saved by `--save-expert-profile`."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"--expert-profile {path}: cannot read it ({e})") from None
    if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT or not isinstance(d.get("layers"), dict):
        raise ModelError(f"--expert-profile {path}: not a kimi-local expert profile")
    if d.get("num_experts") != cfg.num_experts:
        raise ModelError(f"--expert-profile {path}: made for {d.get('num_experts')} experts per layer, "
                         f"this model has {cfg.num_experts}")
    out = {}
    for key, counts in d["layers"].items():
        L = int(key)
        if not cfg.is_moe(L) or L >= cfg.num_hidden_layers or len(counts) != cfg.num_experts:
            raise ModelError(f"--expert-profile {path}: layer {key} does not match this model")
        out[L] = torch.tensor(counts, dtype=torch.float64)
    return out


def save_profile(path: Path, counts: dict[int, torch.Tensor], cfg: KimiConfig, tokens: int) -> None:
    d = {"format": PROFILE_FORMAT, "version": 1, "num_experts": cfg.num_experts, "tokens": int(tokens),
         "layers": {str(L): [round(float(x), 3) for x in c.tolist()] for L, c in sorted(counts.items())}}
    Path(path).write_text(json.dumps(d))


# ---- eviction policies -------------------------------------------------------------------------
class Policy:
    """Per-layer eviction by score: the resident expert with the lowest score goes first.
    Scores live on the host: [E] float64, one per expert (resident or not)."""

    def __init__(self, E: int, prior: torch.Tensor | None = None):
        self.score = torch.zeros(E, dtype=torch.float64)

    def touch(self, experts: torch.Tensor, counts: torch.Tensor, now: int) -> None:
        raise NotImplementedError

    def victims(self, slot_expert: torch.Tensor, pinned: torch.Tensor, m: int) -> torch.Tensor:
        """m slots to overwrite: empty ones first, then the lowest-scored unpinned residents.
        slot_expert [S] int64 (-1 = empty), pinned [S] bool."""
        sc = self.score[slot_expert.clamp(min=0)].clone()
        sc[slot_expert < 0] = -math.inf
        sc[pinned] = math.inf
        order = torch.argsort(sc, stable=True)[:m]
        if m and bool(pinned[order].any()):
            raise RuntimeError("expert pool too small for the experts one step needs")
        return order


class LRU(Policy):
    """Least recently used. A profile orders the initial residents (least popular leave first)."""

    def __init__(self, E: int, prior: torch.Tensor | None = None):
        super().__init__(E)
        if prior is not None and float(prior.max()) > 0:
            self.score = -1.0 + prior.double() / float(prior.max())  # in [-1, 0): older than any real use

    def touch(self, experts, counts, now):
        self.score[experts] = float(now)


class DecayLFU(Policy):
    """Frequency with exponential decay (half-life in tokens): score_e = sum over uses of
    2^((t_use - now) / half_life), kept without touching every expert by growing the weight of new
    uses instead of decaying old ones (rescaled before it overflows)."""

    def __init__(self, E: int, prior: torch.Tensor | None = None, half_life: float = 64.0):
        super().__init__(E)
        self.rate = 1.0 / half_life  # log2 growth per token
        self.t0 = 0
        if prior is not None and float(prior.sum()) > 0:
            # steady-state score of an expert used at rate p per token: p * half_life / ln 2
            self.score = prior.double() / float(prior.sum()) * half_life / math.log(2)

    def touch(self, experts, counts, now):
        e = (now - self.t0) * self.rate
        if e > 500:
            self.score *= 2.0 ** -e
            self.t0, e = now, 0.0
        self.score.index_add_(0, experts, counts.double() * 2.0 ** e)


POLICIES = {"lru": LRU, "lfu": DecayLFU}
DEFAULT_POLICY = "lfu"  # measured better than LRU on Zipf traces, equal on uniform (docs/perf-notes.md)


def make_policy(name: str, E: int, prior: torch.Tensor | None = None) -> Policy:
    try:
        return POLICIES[name](E, prior)
    except KeyError:
        raise ModelError(f"unknown --expert-policy {name!r} (choose from {', '.join(POLICIES)})") from None


# ---- synthetic routing traces + policy simulation (tests, perf notes, benchmark) ---------------
def synthetic_trace(tokens: int, E: int, k: int, zipf_s: float = 0.0, seed: int = 0,
                    shift_every: int = 0) -> torch.Tensor:
    """[tokens, k] distinct expert ids per token: uniform (zipf_s=0) or p(rank r) ~ 1/r^s over a random
    ranking of the experts; shift_every > 0 draws a new ranking every that many tokens (topic drift)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.arange(1, E + 1, dtype=torch.float64) ** -zipf_s
    out = []
    step = shift_every or tokens
    for t0 in range(0, tokens, step):
        n = min(step, tokens - t0)
        perm = torch.randperm(E, generator=g)
        ranks = torch.multinomial(p.expand(n, E), k, replacement=False, generator=g)
        out.append(perm[ranks])
    return torch.cat(out)


def simulate_hit_rate(policy: str, trace: torch.Tensor, S: int, E: int, warmup: int = 0, **kw) -> float:
    """Hit rate of one layer's pool of S slots under `policy` for a [T, k] trace (decode: one token
    per step; the first `warmup` tokens fill the cache and are not counted)."""
    pol = POLICIES[policy](E, **kw)
    slot_expert = torch.full((S,), -1, dtype=torch.int64)
    expert_slot = torch.full((E,), -1, dtype=torch.int64)
    hits = total = 0
    for t in range(trace.shape[0]):
        need = trace[t]
        res = expert_slot[need]
        pinned = torch.zeros(S, dtype=torch.bool)
        pinned[res[res >= 0]] = True
        miss = need[res < 0]
        for s, e in zip(pol.victims(slot_expert, pinned, len(miss)).tolist(), miss.tolist()):
            if slot_expert[s] >= 0:
                expert_slot[slot_expert[s]] = -1
            slot_expert[s], expert_slot[e] = e, s
        pol.touch(need, torch.ones(len(need)), t)
        if t >= warmup:
            hits += int((res >= 0).sum())
            total += len(need)
    return hits / max(total, 1)


# ---- statistics --------------------------------------------------------------------------------
@dataclass
class ExpertStats:
    """Counters of the expert cache (one per model). `summary()` is one line for `--stats` / the REPL."""

    policy: str = ""
    slots: dict = field(default_factory=dict)
    num_experts: int = 0
    tokens: int = 0
    lookups: int = 0  # (layer, step, expert) needs, each expert once per step
    hits: int = 0  # resident when needed (prefetched ones included)
    prefetch_hits: int = 0  # resident because a prefetch brought it
    misses: int = 0
    prefetched: int = 0  # experts copied by prefetch
    guessed: int = 0  # prefetch guesses (precision denominator)
    guess_needed: int = 0  # needs of guessed steps (recall denominator)
    guess_right: int = 0
    h2d_bytes: int = 0
    h2d_s: float = 0.0  # time the copies took (copy stream time on CUDA)
    d2d_bytes: int = 0  # staging: resident experts copied device-to-device
    staged_steps: int = 0
    stall_s: float = 0.0  # time compute waited for copies
    counts: dict = field(default_factory=dict)  # layer -> [E] float64 routing counts (profile)
    _pending: list = field(default_factory=list, repr=False)  # CUDA timing events to resolve
    _device: object = field(default=None, repr=False)  # callable folding GPU-side counters in (device loader)

    def collect(self) -> None:
        """Fold in the counters the GPU-side loader keeps on the device (one transfer)."""
        if self._device is not None:
            self._device(self)

    @property
    def hit_rate(self) -> float:
        self.collect()
        return self.hits / self.lookups if self.lookups else 1.0

    @property
    def prefetch_precision(self) -> float:
        self.collect()
        return self.guess_right / self.guessed if self.guessed else 0.0

    @property
    def prefetch_recall(self) -> float:
        self.collect()
        return self.guess_right / self.guess_needed if self.guess_needed else 0.0

    @property
    def h2d_gbps(self) -> float:
        self.resolve(wait=True)
        return self.h2d_bytes / self.h2d_s / 1e9 if self.h2d_s else 0.0

    @property
    def stall_ms_per_token(self) -> float:
        self.resolve(wait=True)
        return 1e3 * self.stall_s / self.tokens if self.tokens else 0.0

    @property
    def bytes_per_token(self) -> float:
        self.collect()
        return self.h2d_bytes / self.tokens if self.tokens else 0.0

    def resolve(self, wait: bool = False) -> None:
        """Turn finished CUDA event pairs into seconds (kind 'copy' adds to h2d_s, 'stall' to stall_s)."""
        keep = []
        for kind, a, b in self._pending:
            if not wait and not (a.query() and b.query()):  # a stall pair spans two streams
                keep.append((kind, a, b))
                continue
            a.synchronize()
            b.synchronize()
            dt = max(0.0, a.elapsed_time(b) / 1e3)
            if kind == "copy":
                self.h2d_s += dt
            else:
                self.stall_s += dt
        self._pending = keep

    def as_dict(self) -> dict:
        self.collect()
        return {"policy": self.policy, "hit_rate": round(self.hit_rate, 4), "tokens": self.tokens,
                "lookups": self.lookups, "misses": self.misses, "prefetched": self.prefetched,
                "prefetch_hits": self.prefetch_hits, "prefetch_precision": round(self.prefetch_precision, 4),
                "prefetch_recall": round(self.prefetch_recall, 4), "h2d_bytes": self.h2d_bytes,
                "h2d_gbps": round(self.h2d_gbps, 3), "d2d_bytes": self.d2d_bytes,
                "stall_ms_per_token": round(self.stall_ms_per_token, 4), "staged_steps": self.staged_steps}

    def summary(self) -> str:
        self.collect()
        s = sorted(self.slots.values()) or [0]
        per = f"{s[0]}" if s[0] == s[-1] else f"{s[0]}-{s[-1]}"
        pf = (f", prefetch precision {self.prefetch_precision:.0%} recall {self.prefetch_recall:.0%}"
              if self.guessed else "")
        return (f"experts: {per}/{self.num_experts} slots per layer ({self.policy}), hit rate {self.hit_rate:.1%} "
                f"({self.misses} misses, {self.prefetched} prefetched{pf}); moved {self.h2d_bytes / 1e6:,.1f} MB "
                f"({self.bytes_per_token / 1e6:,.2f} MB/token)"
                + (f" at {self.h2d_gbps:,.2f} GB/s, stall {self.stall_ms_per_token:,.3f} ms/token"
                   if self.h2d_s or self._device is None else
                   " (copies inside the decode graph: not timed separately)"))


# ---- host store --------------------------------------------------------------------------------
def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def plan_pinning(layer_bytes: dict[int, int], available: int, headroom: int = 4 << 30) -> list[int]:
    """Layers whose experts fit in pinned memory (in layer order), keeping `headroom` free."""
    room, out = available - headroom, []
    for L in sorted(layer_bytes):
        if layer_bytes[L] <= room:
            out.append(L)
            room -= layer_bytes[L]
    return out


class HostStore:
    """Every routed expert on the host: per layer, (gate, up, down) storages [E, ...] and the objects
    they came from (QTensor or dense, for the pool views). With CUDA: pinned copies where host RAM
    allows (the rest stays in the mapped/CPU tensors, copied synchronously, with a warning)."""

    def __init__(self, source, layers: list[int], pin: bool, pin_budget: int | None = None):
        self.like, self.raw = {}, {}
        for L in layers:
            blocks = source.pools(L)
            self.like[L] = blocks
            self.raw[L] = [_raw(b) for b in blocks]
        self.expert_bytes = {L: sum(_nbytes(r[0]) for r in self.raw[L]) for L in layers}
        E = next(iter(self.raw.values()))[0].shape[0]
        self.pinned_layers: list[int] = []
        if pin:
            sizes = {L: self.expert_bytes[L] * E for L in layers
                     if not all(r.is_pinned() for r in self.raw[L])}
            budget = _mem_available() if pin_budget is None else pin_budget
            todo = plan_pinning(sizes, budget)
            for L in layers:
                if L in sizes and L not in todo:
                    continue
                if L in sizes:
                    self.raw[L] = [self._pinned_copy(r) for r in self.raw[L]]
                self.pinned_layers.append(L)
            short = [L for L in layers if L not in self.pinned_layers]
            if short:
                warnings.warn(f"host RAM is short: pinned the experts of {len(self.pinned_layers)} of {len(layers)} "
                              f"MoE layers; layers {short} are read from the mapped file (slower copies)")
        for L in layers:  # a store on the GPU (weights loaded there) moves to the host
            if self.raw[L][0].device.type != "cpu":
                self.raw[L] = [r.cpu() for r in self.raw[L]]

    @staticmethod
    def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t)
        return out


# ---- copies: CUDA side stream with events, or the CPU emulation ---------------------------------
class _Copier:
    """Host->device copies for the pools. CUDA: a side stream; the copy stream waits on an event of
    the compute stream before overwriting a slot (the last reads are done), the compute stream waits
    on an event of the copy stream before reading (the copies are done). CPU: plain copy_."""

    def __init__(self, device: torch.device, stats: ExpertStats):
        self.cuda = device.type == "cuda"
        self.stats = stats
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._t0 = None
        self._bytes = 0

    def compute_mark(self):
        """An event at the current point of the compute stream (None on CPU)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def after(self, ev) -> None:
        if ev is not None:
            self.stream.wait_event(ev)

    def begin(self) -> None:
        if self.cuda:
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t0.record(self.stream)
        else:
            self._t0 = time.perf_counter()
        self._bytes = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.cuda:
            with torch.cuda.stream(self.stream):
                dst.copy_(src, non_blocking=True)
        else:
            dst.copy_(src)
        self._bytes += _nbytes(src)

    def end(self):
        """Close a batch of copies: returns an event the compute stream can wait on (None on CPU)."""
        if not self.cuda:
            dt = time.perf_counter() - self._t0
            self.stats.h2d_s += dt
            return dt
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.stream)
        self.stats._pending.append(("copy", self._t0, ev))
        return ev

    def compute_wait(self, ev) -> None:
        """The compute stream waits for `ev`; the wait is timed as stall."""
        if not self.cuda or ev is None:
            return
        arrive = torch.cuda.Event(enable_timing=True)
        arrive.record()
        torch.cuda.current_stream().wait_event(ev)
        self.stats._pending.append(("stall", arrive, ev))


# ---- the offloaded expert cache ----------------------------------------------------------------
class _LayerCache:
    """One layer's slot pool and its maps: slot -> expert and expert -> slot (-1 = none), host side."""

    def __init__(self, S: int, E: int, pools: list[torch.Tensor], views: tuple, policy: Policy):
        self.S, self.pools, self.views, self.policy = S, pools, views, policy
        self.slot_expert = torch.full((S,), -1, dtype=torch.int64)
        self.expert_slot = torch.full((E,), -1, dtype=torch.int64)
        self.from_prefetch = torch.zeros(S, dtype=torch.bool)
        self.consumed = None  # compute-stream event after the last reads of this pool
        self.inflight = False  # prefetch copies not yet waited for

    def assign(self, s: int, e: int) -> None:
        old = int(self.slot_expert[s])
        if old >= 0:
            self.expert_slot[old] = -1
        self.slot_expert[s], self.expert_slot[e] = e, s


class OffloadedExperts:
    """Routed experts in per-layer device slot pools filled from a host store (module docstring).

    store: the HostStore of every expert; qtypes: layer -> (gate, up, down) ggml types, for engines
    whose pools are raw kernel-layout bytes (the engine's `GpuExperts.qtypes`)."""

    def __init__(self, cfg: KimiConfig, weights: dict, store: "HostStore", placement: Placement, device,
                 policy: str = DEFAULT_POLICY, prefetch: bool = True,
                 profile: dict[int, torch.Tensor] | None = None, qtypes: dict | None = None,
                 on_device: bool = False):
        self.cfg, self.w, self.placement = cfg, weights, placement
        self.device = torch.device(device)
        self.E, self.k = cfg.num_experts, cfg.num_experts_per_token
        self.layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)]
        self.next_layer = {a: b for a, b in zip(self.layers, self.layers[1:]) if b == a + 1}
        self.prefetch_enabled = prefetch
        self.policy_name = policy
        self.profile = profile  # the counts it started from (added to a saved profile)
        self._qtypes = qtypes
        self.store = store
        self.stats = ExpertStats(policy=policy, slots=dict(placement.slots), num_experts=self.E,
                                 counts={L: torch.zeros(self.E, dtype=torch.float64) for L in self.layers})
        self.copier = _Copier(self.device, self.stats)
        self.cache = {L: self._make_layer(L, placement.slots[L], policy, (profile or {}).get(L))
                      for L in self.layers}
        self._staging = self._make_staging() if any(c.S < self.E for c in self.cache.values()) else None
        self._staged_views: dict[int, tuple] = {}
        self._staging_consumed = None
        self._guess: dict[int, torch.Tensor] = {}
        self._last_layer = None
        self._now = 0
        self._norm_ratio = {L: self._ratio(L, n) for L, n in self.next_layer.items()}
        self._fill_initial(profile)
        self.on_device = on_device
        if on_device:
            self._init_device_tables()

    # ---- construction ------------------------------------------------------------------------
    def _make_layer(self, L: int, S: int, policy: str, prior) -> _LayerCache:
        S = min(S, self.E)
        pools = [torch.empty((S, *r.shape[1:]), dtype=r.dtype, device=self.device) for r in self.store.raw[L]]
        views = tuple(_wrap(like, p) for like, p in zip(self.store.like[L], pools))
        return _LayerCache(S, self.E, pools, views, make_policy(policy, self.E, prior))

    def _make_staging(self) -> torch.Tensor:
        """One flat byte buffer of E experts of the largest layer; viewed per layer when staging."""
        return torch.empty(self.E * max(self.store.expert_bytes.values()) + 256 * 3, dtype=torch.uint8,
                           device=self.device)

    def _staging_for(self, L: int) -> tuple[list[torch.Tensor], tuple]:
        """Views of the staging buffer as layer L's pools ([E, ...] per projection, 256-byte aligned)."""
        off, pools = 0, []
        for r in self.store.raw[L]:
            n = _nbytes(r)
            pools.append(self._staging[off : off + n].view(r.dtype).view(r.shape))
            off += (n + 255) // 256 * 256
        return pools, tuple(_wrap(like, p) for like, p in zip(self.store.like[L], pools))

    def _ratio(self, L: int, nxt: int) -> torch.Tensor | None:
        """ffn_norm(L+1) / ffn_norm(L): turns layer L's normed FFN input into a guess of L+1's."""
        a, b = self.w.get(f"blk.{L}.ffn_norm.weight"), self.w.get(f"blk.{nxt}.ffn_norm.weight")
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            return None
        a, b = a.float(), b.float()
        return torch.where(a.abs() > 1e-6, b / a, torch.zeros_like(a)).to(self.device)

    def _fill_initial(self, profile) -> None:
        """The S most popular experts of each layer (the first S when no profile), copied in now."""
        self.copier.begin()
        for L, c in self.cache.items():
            p = (profile or {}).get(L)
            order = torch.argsort(p, descending=True, stable=True) if p is not None else torch.arange(self.E)
            for s, e in enumerate(order[: c.S].tolist()):
                c.assign(s, e)
                self._copy_expert(L, e, c.pools, s)
        ev = self.copier.end()
        if self.copier.cuda:
            torch.cuda.current_stream().wait_event(ev)
        self.stats.h2d_bytes = 0  # initial fill is loading, not traffic
        self.stats.h2d_s = 0.0
        self.stats._pending.clear()

    def _copy_expert(self, L: int, e: int, pools: list[torch.Tensor], s: int) -> None:
        for dst, src in zip(pools, self.store.raw[L]):
            self.copier.copy(dst[s], src[e])
        self.stats.h2d_bytes += self.store.expert_bytes[L]

    # ---- the interface the model uses --------------------------------------------------------
    def pools(self, layer: int):
        """(gate [S, F, ...], up, down) of the slots `prepare(layer)` returned."""
        return self._staged_views.get(layer) or self.cache[layer].views

    def qtypes(self, layer: int):
        return self._qtypes[layer]

    @torch.no_grad()
    def prepare(self, layer: int, ids: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """Make the experts in ids [T, k] resident in layer's pool (or the staging pool when the chunk
        needs more than the pool holds); start the prefetch of the next layer. Returns slots [T, k].
        With the tables on the device, one decode token (T = 1) never leaves the GPU (_prepare_device)."""
        nxt = self.next_layer.get(layer) if self.prefetch_enabled and h is not None else None
        if self.on_device:
            if ids.shape[0] == 1:
                return self._prepare_device(layer, ids, h, nxt)
            touched = [layer] + ([nxt] if nxt is not None else [])
            self._pull(touched)
            try:
                return self._prepare_host(layer, ids, h, nxt)
            finally:
                self._push(touched)
        return self._prepare_host(layer, ids, h, nxt)

    def _prepare_host(self, layer: int, ids: torch.Tensor, h: torch.Tensor | None, nxt: int | None) -> torch.Tensor:
        """Host-side decisions (one sync per layer): the CPU emulation, prefill chunks, --expert-loader host."""
        self._mark_consumed(layer)
        guess = self._route_guess(layer, nxt, h) if nxt is not None else None
        ids_h, guess_h = self._to_host(ids, guess)  # the host sync the cache decisions need
        T = ids.shape[0]
        if layer == self.layers[0]:
            self.stats.tokens += T
            self._now += T
            self.stats.resolve()
        uniq, counts = torch.unique(ids_h, return_counts=True)
        self._count(layer, uniq, counts)
        c = self.cache[layer]
        self._staged_views.pop(layer, None)
        if len(uniq) <= c.S:
            slot_of = self._demand(layer, uniq)
        else:
            slot_of = self._stage(layer, uniq)
        if self.on_device:
            self._touch_device(layer, uniq, counts, T)
        else:
            c.policy.touch(uniq, counts.double(), self._now)
        slots = slot_of[ids_h].to(self.device, non_blocking=True)
        if guess_h is not None:
            self._prefetch(nxt, guess_h)
        self._last_layer = layer
        return slots

    # ---- steps of prepare ----------------------------------------------------------------------
    def _mark_consumed(self, layer: int) -> None:
        """Everything enqueued so far includes the compute that read the previous layer's pool."""
        prev = self._last_layer
        if prev is None or not self.copier.cuda:
            return
        ev = self.copier.compute_mark()
        self.cache[prev].consumed = ev
        if prev in self._staged_views:
            self._staging_consumed = ev

    def _route_guess(self, layer: int, nxt: int, h: torch.Tensor) -> torch.Tensor:
        """Layer nxt's router on this layer's FFN input rescaled to nxt's norm: ids [T, k] (device)."""
        from kimi_local.model import linear

        b = f"blk.{nxt}."
        r = self._norm_ratio.get(layer)
        x = h.float() * r if r is not None else h.float()
        s = torch.sigmoid(linear(x, self.w[b + "ffn_gate_inp.weight"]).float())
        return torch.topk(s + self.w[b + "exp_probs_b.bias"].float(), self.k, dim=-1).indices

    @staticmethod
    def _to_host(ids: torch.Tensor, guess: torch.Tensor | None):
        if guess is None:
            return ids.to("cpu", torch.int64), None
        both = torch.cat([ids.reshape(-1).long(), guess.reshape(-1).long()]).cpu()
        return both[: ids.numel()].view(ids.shape), both[ids.numel():].view(guess.shape)

    def _count(self, layer: int, uniq: torch.Tensor, counts: torch.Tensor) -> None:
        st = self.stats
        st.counts[layer].index_add_(0, uniq, counts.double())
        st.lookups += len(uniq)
        g = self._guess.pop(layer, None)
        if g is not None:
            st.guessed += len(g)
            st.guess_needed += len(uniq)
            st.guess_right += int(torch.isin(g, uniq).sum())

    def _demand(self, layer: int, uniq: torch.Tensor) -> torch.Tensor:
        """Copy the missing experts into the pool (victims: never one this step needs)."""
        c, st = self.cache[layer], self.stats
        res = c.expert_slot[uniq]
        hit = res >= 0
        st.hits += int(hit.sum())
        st.prefetch_hits += int(c.from_prefetch[res[hit]].sum())
        c.from_prefetch.zero_()
        miss = uniq[~hit]
        st.misses += len(miss)
        ev = None
        if len(miss):
            pinned = torch.zeros(c.S, dtype=torch.bool)
            pinned[res[hit]] = True
            victims = c.policy.victims(c.slot_expert, pinned, len(miss))
            t0 = time.perf_counter()
            self.copier.after(c.consumed)
            self.copier.begin()
            for s, e in zip(victims.tolist(), miss.tolist()):
                c.assign(s, e)
                self._copy_expert(layer, e, c.pools, s)
            ev = self.copier.end()
            if not self.copier.cuda:
                st.stall_s += time.perf_counter() - t0
        elif c.inflight and self.copier.cuda:  # prefetched copies may still be running
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(self.copier.stream)
        self.copier.compute_wait(ev)
        c.inflight = False
        return c.expert_slot

    def _stage(self, layer: int, uniq: torch.Tensor) -> torch.Tensor:
        """More experts than slots: gather all of them in the staging pool (resident ones from the pool,
        device-to-device; the others from the host). slot = position in uniq."""
        c, st = self.cache[layer], self.stats
        pools, views = self._staging_for(layer)
        res = c.expert_slot[uniq]
        st.hits += int((res >= 0).sum())
        st.prefetch_hits += int(c.from_prefetch[res[res >= 0]].sum())
        c.from_prefetch.zero_()
        st.misses += int((res < 0).sum())
        st.staged_steps += 1
        t0 = time.perf_counter()
        self.copier.after(self._staging_consumed)
        self.copier.begin()
        for j, (e, s) in enumerate(zip(uniq.tolist(), res.tolist())):
            if s >= 0:
                for dst, src in zip(pools, c.pools):
                    self.copier.copy(dst[j], src[s])
                st.d2d_bytes += self.store.expert_bytes[layer]
            else:
                self._copy_expert(layer, e, pools, j)
        ev = self.copier.end()
        if not self.copier.cuda:
            st.stall_s += time.perf_counter() - t0
        self.copier.compute_wait(ev)
        c.inflight = False
        self._staged_views[layer] = views
        slot_of = torch.full((self.E,), -1, dtype=torch.int64)
        slot_of[uniq] = torch.arange(len(uniq))
        return slot_of

    def _prefetch(self, nxt: int, guess: torch.Tensor) -> None:
        """Start copying the guessed experts of layer nxt that are not resident (most-voted first,
        at most the pool size); they are counted as prefetch hits if nxt then needs them."""
        c, st = self.cache[nxt], self.stats
        uniq, votes = torch.unique(guess, return_counts=True)
        self._guess[nxt] = uniq
        res = c.expert_slot[uniq]
        pinned = torch.zeros(c.S, dtype=torch.bool)
        pinned[res[res >= 0]] = True
        miss = uniq[res < 0][torch.argsort(votes[res < 0], descending=True, stable=True)]
        miss = miss[: max(0, c.S - int(pinned.sum()))]
        if not len(miss):
            return
        victims = c.policy.victims(c.slot_expert, pinned, len(miss))
        self.copier.after(c.consumed)
        self.copier.begin()
        for s, e in zip(victims.tolist(), miss.tolist()):
            c.assign(s, e)
            c.from_prefetch[s] = True
            self._copy_expert(nxt, e, c.pools, s)
        self.copier.end()
        st.prefetched += len(miss)
        c.inflight = True

    # ---- tables on the device (decode inside the CUDA graph) -------------------------------------
    def _init_device_tables(self) -> None:
        """Move the cache tables to the device (kernels/expert_cache.py) after the initial fill; the
        host copies become a mirror that prefill chunks pull and push around their host-side work."""
        from kimi_local.kernels.expert_cache import STAT, LayerTables

        n = len(self.layers)
        self._dev_stats = torch.zeros(n, len(STAT), dtype=torch.int64, device=self.device)
        self._dev_counts = torch.zeros(n, self.E, dtype=torch.float32, device=self.device)
        self.tables = {}
        for j, L in enumerate(self.layers):
            c = self.cache[L]
            t = LayerTables(c.S, self.E, self.k, self.device, self.policy_name)
            t.stats, t.counts = self._dev_stats[j], self._dev_counts[j]
            self.tables[L] = t
        # prefetch guess in two launches: layer nxt's router with the norm ratio folded into its columns
        # (bf16, [E, D]), read by the router GEMV kernel, then the top-k of the route kernel (not the
        # one-launch router_route: its arrival counters are shared, and this runs on the prefetch stream)
        self._guess_w = {}
        for L, nxt in self.next_layer.items():
            wr = self.w[f"blk.{nxt}.ffn_gate_inp.weight"].float().to(self.device)
            r = self._norm_ratio.get(L)
            self._guess_w[L] = (wr * r[None, :] if r is not None else wr).to(torch.bfloat16).contiguous()
        self._pf_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pf_pending: set[int] = set()  # layers whose decode prefetch copies run on _pf_stream
        self._host_pending: set[int] = set()  # layers whose prefill prefetch copies run on the copier stream
        self._push(self.layers, scores=True)
        self.stats._device = self._collect_device

    def release(self) -> None:
        """Free the device memory (slot pools, staging, tables) now, whoever still holds this object."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for c in self.cache.values():
            c.pools, c.views = [], ()
        self._staging, self._staged_views, self.tables = None, {}, {}

    def device_counters(self) -> list[torch.Tensor]:
        """Tensors a CUDA-graph warm-up must restore so that it does not count as traffic."""
        return [self._dev_stats, self._dev_counts] if self.on_device else []

    def _pull(self, layers) -> None:
        """Device tables -> the host mirror (a sync; prefill only)."""
        for L in layers:
            c, t = self.cache[L], self.tables[L]
            c.expert_slot = t.expert_slot.long().cpu()
            c.slot_expert = t.slot_expert.long().cpu()
            c.from_prefetch = t.flag.bool().cpu()
            c.policy.score = t.score.double().cpu()
            c.inflight = False
        if self._pf_stream is not None and self._pf_pending:  # decode prefetches still copying
            torch.cuda.current_stream(self.device).wait_stream(self._pf_stream)
            self._pf_pending.clear()

    def _push(self, layers, scores: bool = False) -> None:
        """The host mirror -> device tables. Host-side prefetch copies may still run on the copier's
        stream: the next device-side resolve of that layer waits for them (_host_pending)."""
        for L in layers:
            c, t = self.cache[L], self.tables[L]
            if c.inflight:
                self._host_pending.add(L)
                c.inflight = False
            t.expert_slot.copy_(c.expert_slot)
            t.slot_expert.copy_(c.slot_expert)
            t.flag.copy_(c.from_prefetch)
            if scores:
                t.score.copy_(c.policy.score)

    def _touch_device(self, layer: int, uniq: torch.Tensor, counts: torch.Tensor, T: int) -> None:
        """The device policy's update for a chunk of T tokens (the resolve kernel's, T steps at once)."""
        t = self.tables[layer]
        used = torch.zeros(self.E, dtype=torch.float32)
        used[uniq] = counts.float()
        used = used.to(self.device)
        if t.lru:
            t.score.copy_(torch.where(used > 0, t.clock + (T - 1), t.score))
        else:
            t.score.mul_(t.decay ** T).add_(used)
        t.clock += T

    def _prepare_device(self, layer: int, ids: torch.Tensor, h: torch.Tensor | None, nxt: int | None):
        """One decode token, no host sync: resolve hits/victims on the GPU, copy the misses (compute
        stream: the MoE needs them now), then guess layer nxt's experts and start their copies on a
        side stream that layer nxt's own resolve joins."""
        from kimi_local.kernels.expert_cache import copy_misses, resolve

        cuda = self._pf_stream is not None
        cur = torch.cuda.current_stream(self.device) if cuda else None
        if cuda and layer in self._pf_pending:
            cur.wait_stream(self._pf_stream)
            self._pf_pending.discard(layer)
        if cuda and layer in self._host_pending:
            cur.wait_stream(self.copier.stream)
            self._host_pending.discard(layer)
        self._staged_views.pop(layer, None)
        t, c = self.tables[layer], self.cache[layer]
        slots = resolve(t, ids.reshape(-1).to(torch.int32))
        copy_misses(t.miss, self.store.raw[layer], c.pools, C=32)  # on the critical path: more programs
        if nxt is not None:
            tn, cn = self.tables[nxt], self.cache[nxt]
            resolve(tn, self._device_guess(layer, nxt, h).reshape(-1), prefetch=True)
            if cuda:
                self._pf_stream.wait_stream(cur)
                with torch.cuda.stream(self._pf_stream):
                    copy_misses(tn.pf_miss, self.store.raw[nxt], cn.pools)
                self._pf_pending.add(nxt)
            else:
                copy_misses(tn.pf_miss, self.store.raw[nxt], cn.pools)
        return slots.view(1, -1)

    def _device_guess(self, layer: int, nxt: int, h: torch.Tensor) -> torch.Tensor:
        """_route_guess for one token on the device: ids [1, k] int32 in two launches."""
        from kimi_local.kernels.router import route, router_logits

        logits = router_logits(h.reshape(1, -1), self._guess_w[layer])
        ids, _ = route(logits, self.w[f"blk.{nxt}.exp_probs_b.bias"], self.k, 1.0)
        return ids

    def _collect_device(self, st: "ExpertStats") -> None:
        """Add the device counters (columns named as ExpertStats fields, see expert_cache.STAT) to st
        and zero them; the counts are only copied when something was counted."""
        from kimi_local.kernels.expert_cache import STAT

        d = self._dev_stats.to("cpu", copy=True)
        if not bool(d.any()):
            return
        counts = self._dev_counts.to("cpu", copy=True)
        self._dev_stats.zero_()
        self._dev_counts.zero_()
        st.tokens += int(d[0, 0])  # "demands" of the first MoE layer: one per decode token
        for j, name in enumerate(STAT[1:], 1):
            setattr(st, name, getattr(st, name) + int(d[:, j].sum()))
        for j, L in enumerate(self.layers):
            st.h2d_bytes += int(d[j, 3] + d[j, 4]) * self.store.expert_bytes[L]
            st.counts[L] += counts[j].double()

    # ---- profile --------------------------------------------------------------------------------
    def save_profile(self, path: Path, base: dict[int, torch.Tensor] | None = None) -> None:
        """Routing counts of this run (plus `base`, e.g. the profile it started from) as JSON."""
        self.stats.collect()  # the device loader keeps its counts on the GPU until asked
        counts = {L: c + (base or {}).get(L, 0) for L, c in self.stats.counts.items()}
        save_profile(path, counts, self.cfg, self.stats.tokens)


# ---- CPU compute for misses? -------------------------------------------------------------------
def miss_costs(store: HostStore, layer: int, device, reps: int = 3) -> dict:
    """One miss both ways, best of reps: copy expert 0's blocks host -> device, or run one token through
    it on the CPU (the reference dequant + GEMV; kernel-layout raw bytes cannot be computed on the CPU).
    Returns {"copy_ms", "cpu_ms", "use"}: what a miss should do on this machine."""
    import torch.nn.functional as F

    from kimi_local.model import linear

    device = torch.device(device)
    src = [r[0] for r in store.raw[layer]]
    dst = [torch.empty_like(t, device=device) for t in src]
    like = [b[0] if isinstance(b, QTensor) or b.is_floating_point() else None for b in store.like[layer]]
    copy_ms = cpu_ms = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for d, s in zip(dst, src):
            d.copy_(s, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        copy_ms = min(copy_ms, 1e3 * (time.perf_counter() - t0))
        if all(w is not None for w in like):
            x = torch.randn(1, like[0].shape[-1])
            t0 = time.perf_counter()
            linear(F.silu(linear(x, like[0])) * linear(x, like[1]), like[2])
            cpu_ms = min(cpu_ms, 1e3 * (time.perf_counter() - t0))
    return {"copy_ms": copy_ms, "cpu_ms": cpu_ms, "use": "cpu" if cpu_ms < copy_ms else "copy"}


# ---- entry point -------------------------------------------------------------------------------
LOADERS = ("device", "host")


def apply_offload(local_model, vram: int, ctx: int | None, policy: str = DEFAULT_POLICY,
                  profile: Path | None = None, kv_bytes_per_value: float = 2.0,
                  prefetch: bool = True, loader: str = "device") -> OffloadedExperts:
    """Swap `local_model.net.experts` for an OffloadedExperts sized for `vram` at `ctx` tokens and set
    `net.expert_stats`. Works on CPU too (an emulated budget through the same slot machinery).
    loader="device": the engine's decode steps decide hits and copy misses on the GPU, inside the
    decode graph (needs the GPU engine and a pinned host store; otherwise falls back to "host");
    "host": decisions on the host, one sync per MoE layer, no decode graph."""
    if loader not in LOADERS:
        raise ModelError(f"unknown --expert-loader {loader!r} (choose from {', '.join(LOADERS)})")
    net = local_model.net if hasattr(local_model, "net") else local_model
    cfg = net.cfg
    ctx = ctx or cfg.model_max_length
    if policy not in POLICIES:
        raise ModelError(f"unknown --expert-policy {policy!r} (choose from {', '.join(POLICIES)})")
    prof = load_profile(profile, cfg) if profile else None
    layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)]
    source = net.experts
    if isinstance(source, OffloadedExperts):  # re-planned (another budget, policy or loader): same host store
        store, qtypes = source.store, source._qtypes
        expert_bytes = dict(store.expert_bytes)
        source.release()
    else:
        expert_bytes = {L: sum(_nbytes(_raw(b)[0]) for b in source.pools(L)) for L in layers}
        qtypes = {L: source.qtypes(L) for L in layers} if hasattr(source, "qtypes") else None
        store = HostStore(source, layers, pin=net.device.type == "cuda")
    place = plan_placement(cfg, vram, ctx, resident_bytes(net.w), expert_bytes, kv_bytes_per_value, prof)
    net.experts = source = None  # drop the device copies (if any) before the pools are allocated
    for L in layers:  # the model's own references to the full stacks now point at the host store
        for p, raw, like in zip(PROJ, store.raw[L], store.like[L]):
            name = f"blk.{L}.ffn_{p}_exps.weight"
            if name in net.w:
                net.w[name] = _wrap(like, raw)
        store.like[L] = tuple(_wrap(like, raw) for like, raw in zip(store.like[L], store.raw[L]))
    if net.device.type == "cuda":
        torch.cuda.empty_cache()
    on_device = (loader == "device" and qtypes is not None and hasattr(net, "use_graph")
                 and all(r.is_pinned() or net.device.type == "cpu" for L in layers for r in store.raw[L]))
    off = OffloadedExperts(cfg, net.w, store, place, net.device, policy, prefetch, prof, qtypes, on_device=on_device)
    net.experts = off
    net.expert_stats = off.stats
    if hasattr(net, "use_graph"):
        net._graph_wanted = getattr(net, "_graph_wanted", net.use_graph)
        # host-side decisions sync between layers: no whole-step graph then
        net.use_graph = net._graph_wanted and on_device
    if hasattr(net, "_graphs"):
        net._graphs.clear()  # graphs captured with the previous experts' pools
    return off
