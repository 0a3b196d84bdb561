"""Figure 2's real backbones on this machine: first load (builds the cache), cached load, size, one forward pass.

    python benchmarks/backbone_load.py --cache-dir /tmp/fresh-cache                 # the four of Figure 2
    python benchmarks/backbone_load.py --cache-dir /tmp/fresh-cache smollm2-135m minilm-l6

A fresh ``--cache-dir`` times the first load with its cache build (joining and checking the split packages,
de-quantising a GGUF); the second load reads that cache. The forward pass is the base model, float32, no
grad, on 8 copies of a ML-100K-like hard prompt (8 titles), best of 3 after one warm-up; ``--threads 1`` by
default, as the adapter benchmarks on a shared CPU. Packages missing: their row says which to install.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from idle_ray.llm.backbone import load_backbone  # noqa: E402

PROMPT = ("A user watched these movies in order: Toy Story (1995), Heat (1995), Casino (1995), Se7en (1995), "
          "Fargo (1996), Star Wars (1977), Contact (1997), Scream (1996). The next movie the user will watch is")


def measure(name: str, cache_dir: str, batch: int) -> str:
    try:
        t0 = time.perf_counter()
        bb = load_backbone(name, cache_dir=cache_dir)
        first = time.perf_counter() - t0
    except ImportError as e:
        return f"| {name} | not installed: {e} |"
    t0 = time.perf_counter()
    bb = load_backbone(name, cache_dir=cache_dir)
    cached = time.perf_counter() - t0
    enc = bb.tokenizer([PROMPT] * batch, padding=True, return_tensors="pt")
    times = []
    with torch.no_grad():
        bb.model(**enc)
        for _ in range(3):
            t0 = time.perf_counter()
            out = bb.model(**enc).last_hidden_state
            times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in bb.model.parameters())
    return (f"| {name} | {bb.kind} | {bb.num_layers} x {bb.hidden_size} | {params:,} | {first:.1f} | {cached:.1f} | "
            f"{batch} x {enc['input_ids'].shape[1]} | {min(times) * 1000:.0f} | {bool(torch.isfinite(out).all())} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbones", nargs="*", default=["smollm2-135m", "gemma3-270m", "minilm-l6", "mpnet-base"])
    parser.add_argument("--cache-dir", required=True, help="a fresh folder times the cache builds")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(name, args.cache_dir, args.batch) for name in args.backbones]
    print(f"\ntorch threads {args.threads}, float32\n")
    print("| backbone | kind | layers x hidden | parameters | first load s | cached load s | batch x tokens "
          "| forward ms | finite |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
