"""Write a tiny random-weight Kimi-Linear checkpoint in the real HF layout.

usage: python scripts/make_tiny_checkpoint.py OUT_DIR [--seed N]
"""
import argparse
from pathlib import Path

from kimi_local.tiny import make_checkpoint

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(make_checkpoint(a.out_dir, seed=a.seed))
