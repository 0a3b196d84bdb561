"""Evaluate trained adapter weights or the pre-trained ID model on one split (test by default).

    python jobs/evaluate.py --config configs/train_ml100k.yaml                 # the run jobs/train.py made
    python jobs/evaluate.py --config configs/train_ml100k.yaml --run NAME      # a run under train.storage_path
    python jobs/evaluate.py --config configs/train_ml100k.yaml --weights PATH/best_trainable.safetensors
    python jobs/evaluate.py --config configs/train_ml100k.yaml --kind id_model --split valid
    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/train_ml1m.yaml --run NAME

Give the config the weights were trained with (adapter, backbone, prompt, data): the weights file
records it, and weights from another config, vocabulary or ID model stop the job with exit code 2
naming the file, the fields and the fix. Metrics (``eval.protocols``) are printed and written as
JSON (``--output``, default ``results/evaluate/<run or model>-<split>.json``). Test is meant to
be read once: select models on ``--split valid``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["adapter", "id_model"], default="adapter",
                   help="adapter: the config's adapter variant with trained weights; id_model: the ID-model artifact "
                        "(id_model.artifact, or the one the pre-training job exported for this config)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--weights", default="", help="adapter weights (path or s3:// / gs:// URI), e.g. a run's "
                                                      "checkpoint_*/best_trainable.safetensors")
    source.add_argument("--run", default="", help="run name under train.storage_path: its best weights "
                                                  "(default: the run jobs/train.py trains for this config)")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--output", default="", help="write the result JSON here")
    args, cfg = cli.parse(p, argv)
    from idle_ray.models.artifact import ArtifactError
    from idle_ray.results.files import write_json
    from idle_ray.train.runs import evaluate_saved

    try:
        record, label, prepared = evaluate_saved(cfg, args.kind, args.split, args.weights, args.run)
    except ArtifactError as e:
        cli.fail(e)
    metrics = record[args.split]
    what = cfg.id_model.name if args.kind == "id_model" else cfg.adapter.variant
    for protocol in cfg.eval.protocols:
        print(f"\n{what} on {prepared.manifest['dataset']} (seed {cfg.seed}), {args.split}, {protocol} ranking, "
              f"{metrics['users']} users:")
        print(" ".join(f"{k} {v:.4f}" for k, v in metrics[protocol].items()))
    out = write_json(args.output or os.path.join("results", "evaluate", f"{label}-{args.split}.json"), record)
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run_main(main)
