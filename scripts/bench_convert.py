"""Converter throughput and peak memory on a synthetic checkpoint with the real layer widths
(hidden 2304, KDA 32x128, MLA 32 heads / rank 512, experts 1024 wide, dense FFN 9216) but 3 layers
(KDA + dense FFN, KDA + MoE, MLA + MoE), 16 experts and a 768-token vocabulary.

    python scripts/bench_convert.py /tmp/bench [F16 Q8_0 Q4_K_M ...]

Each conversion runs in its own process; its peak RSS (VmHWM, which includes the memory-mapped
safetensors pages it has touched), peak anonymous RSS (sampled every 10 ms) and MB/s (bf16 bytes
read per second and GGUF bytes written per second) are printed as a markdown table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

RUNNER = r"""
import json, sys, threading, time
from kimi_local.api import resolve_device
from kimi_local.quant.convert import convert
from kimi_local.quant.recipe import get_recipe

def status_kb(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])

peak_anon = [0]
def sample():  # RssAnon: memory the process owns (RSS also counts the mapped safetensors pages)
    while True:
        peak_anon[0] = max(peak_anon[0], status_kb("RssAnon"))
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
base = status_kb("VmHWM")  # VmHWM: peak RSS of this process image (ru_maxrss would include the parent's)
rep = convert(sys.argv[1], sys.argv[2], get_recipe(sys.argv[3]), device=resolve_device("auto"), force=True,
              progress=False)
print(json.dumps({"seconds": rep.seconds, "bytes": rep.nbytes, "base_rss_kb": base, "peak_rss_kb": status_kb("VmHWM"),
                  "peak_anon_kb": peak_anon[0]}))
"""


def bench_config():
    from kimi_local.config import KimiConfig, tiny_config

    return dataclasses.replace(
        KimiConfig(), num_hidden_layers=3, kda_layers=[1, 2], full_attn_layers=[3], num_experts=16,
        vocab_size=tiny_config().vocab_size, bos_token_id=512, eos_token_id=514, pad_token_id=767)


def main(out: Path, recipes: list[str]) -> None:
    from kimi_local.tiny import make_checkpoint

    src = out / "ckpt"
    if not (src / "config.json").is_file():
        make_checkpoint(src, bench_config(), seed=0, n_shards=4)
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(f"checkpoint: {src_bytes / 1e6:.0f} MB of safetensors; load average before: {os.getloadavg()}\n")
    print("| recipe | GGUF MB | seconds | read MB/s (bf16) | write MB/s | peak RSS MB | peak RssAnon MB | RSS after imports MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in recipes:
        res = subprocess.run([sys.executable, "-c", RUNNER, str(src), str(out / f"{r}.gguf"), r],
                             capture_output=True, text=True, check=True)
        d = json.loads(res.stdout.strip().splitlines()[-1])
        s = d["seconds"]
        print(f"| {r} | {d['bytes'] / 1e6:.0f} | {s:.1f} | {src_bytes / 1e6 / s:.1f} | {d['bytes'] / 1e6 / s:.1f} "
              f"| {d['peak_rss_kb'] / 1024:.0f} | {d['peak_anon_kb'] / 1024:.0f} | {d['base_rss_kb'] / 1024:.0f} |", flush=True)
        (out / f"{r}.gguf").unlink()
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or ["F16", "Q8_0", "Q4_K_M"])
