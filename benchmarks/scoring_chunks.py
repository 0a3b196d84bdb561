"""Adapter scoring: one pass over an evaluation batch vs length-sorted chunks, on the same batch.

    python benchmarks/scoring_chunks.py --config configs/main_ml100k.yaml --run NAME --users 256 --repeats 2

An evaluation batch (``eval.batch_size`` prompts) is padded to its longest prompt; since the chunked
path (``IDLEModel.full_sort_predict``) scores rows in chunks of ``PREDICT_CHUNK`` rows of similar
length, each trimmed to its longest, fewer tokens go through the frozen LLM. This builds one batch
of the first ``--users`` users of ``--split`` exactly as the evaluation stage does (windows, prompt
tokenisation), loads the run's best weights (anchored as the config says), and times both paths on
it, interleaved, in CPU seconds of this process (robust to other load on the machine), then checks
that they give the same scores and the same top-10 lists. Single process, no Ray.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from idle_ray import cli  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_config_args(parser)
    parser.add_argument("--run", default="", help="run name under train.storage_path (default: the config's run)")
    parser.add_argument("--split", default="test", choices=("valid", "test"))
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    cfg = cli.load_config_args(args)

    from idle_ray.data.pipeline import local_numpy_reader
    from idle_ray.train.builders import encode_prompts, prompt_stage_kwargs
    from idle_ray.train.evaluate import scoring_model
    from idle_ray.train.runs import evaluation_inputs
    torch.set_num_threads(args.threads)
    inputs = evaluation_inputs(cfg, run=args.run)
    prepared = inputs["prepared"]
    model = scoring_model(cfg, prepared, "adapter", inputs["record"]["weights"], inputs["artifact"])
    parts = list(local_numpy_reader(prepared, args.split, cfg.data.max_history))
    batch = {k: np.concatenate([p[k] for p in parts])[: args.users] for k in ("history", "target", "user")}
    batch = encode_prompts(batch, **prompt_stage_kwargs(cfg, prepared))
    batch = {k: torch.from_numpy(v) for k, v in batch.items() if k not in ("seen", "user")}
    lengths = batch["attention_mask"].sum(1).float()
    print(f"{len(lengths)} prompts, real tokens mean {lengths.mean():.1f}, max {lengths.max():.0f}, "
          f"padded width {batch['input_ids'].shape[1]}; {args.threads} thread(s)")
    paths = {"one pass (padded to the batch's longest)": model._predict,
             "length-sorted chunks": model.full_sort_predict}
    times = {name: [] for name in paths}
    scores = {}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            cpu = time.process_time()
            scores[name] = fn(batch)
            times[name].append(time.process_time() - cpu)
    (one, chunks), (a, b) = times.values(), scores.values()
    print("| path | CPU s (median of %d) | vs one pass |" % args.repeats)
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {np.median(t):.1f} | {np.median(t) / np.median(one):.2f}x |")
    diff = float((a[:, 1:] - b[:, 1:]).abs().max())
    same = bool((a.topk(10).indices == b.topk(10).indices).all())
    print(f"max |score difference| {diff:.2e}; same top-10 for every user: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
