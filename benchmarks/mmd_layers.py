"""Benchmark: the adapter's layer-wise MMD as one batched computation vs one chain per layer.

Forward + backward of ``mean_l MMD²(p^(l), sg(x^(l)))`` over ``--layers`` layers with the
adapter's shapes (``--tokens`` ID-token states, ``--text`` text states capped at 512 for the
within-sample term, width ``--hidden``), computed by :func:`idle_ray.adapter.mmd.mmd2_layers`
on stacked layers (ours) and by :func:`idle_ray.adapter.mmd.mmd2` layer by layer (the previous
code). Prints operator calls per step (counted by ``torch.profiler``: a GPU launches a kernel per
call, which is what the per-layer chain costs there) and the median step time of ``--repeats``
alternating passes.

    python benchmarks/mmd_layers.py                                 # SmolLM2-135M, CPU batch 16 x k 4
    python benchmarks/mmd_layers.py --tokens 1024 --device cuda      # GPU batch 128 x k 8
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray.adapter.mmd import mmd2, mmd2_layers  # noqa: E402

CAP = 512  # IDLEModel's default mmd_within_sample_cap


def batched(tokens, text):
    return mmd2_layers(tokens, text, within_sample_cap=CAP).mean()


def looped(tokens, text):
    return torch.stack([mmd2(tokens[l], text[l], within_sample_cap=CAP) for l in range(tokens.shape[0])]).mean()


def step(fn, tokens, text, device):
    if tokens.grad is not None:
        tokens.grad = None
    t0 = time.perf_counter()
    fn(tokens, text).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def op_calls(fn, tokens, text) -> int:
    from torch.profiler import profile

    with profile() as prof:
        fn(tokens, text).backward()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--tokens", type=int, default=64, help="ID-token states per step (batch x k)")
    p.add_argument("--text", type=int, default=2048, help="text states per step (mmd_max_text_states)")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(args.layers, args.tokens, args.hidden, generator=gen).to(device).requires_grad_(True)
    text = torch.randn(args.layers, args.text, args.hidden, generator=gen).to(device)
    fns = {"per layer (before)": looped, "batched (ours)": batched}
    for fn in fns.values():  # warm-up
        step(fn, tokens, text, device)
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(step(fn, tokens, text, device))
    calls = {name: op_calls(fn, tokens, text) for name, fn in fns.items()}
    base = statistics.median(times["per layer (before)"])
    print(f"\nMMD over {args.layers} layers: {args.tokens} ID-token x {args.text} text states, width "
          f"{args.hidden}, {device}, {args.threads} thread(s), median of {args.repeats}\n")
    print("| computation | aten calls / step | ms / step | time vs per layer |\n|---|---|---|---|")
    for name in fns:
        med = statistics.median(times[name])
        print(f"| {name} | {calls[name]} | {med * 1e3:.1f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
