"""Train one IDLE-Adapter variant on Ray Train + DeepSpeed (pre-training the ID model first if needed),
then evaluate the validation-selected adapter once on test.

    python jobs/train.py --config configs/train_ml100k.yaml
    python jobs/train.py --config configs/train_ml100k.yaml --set adapter.variant=llm_only
    ray job submit --working-dir . -- python jobs/train.py --config configs/train_ml1m.yaml
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402
from idle_ray.config import config_hash  # noqa: E402


def run_name(cfg) -> str:
    return f"{cfg.name}-{cfg.adapter.variant}-s{cfg.seed}-{config_hash(cfg)[:8]}"


def train_and_test(cfg, prepared, artifact: str, log=print) -> dict:
    """Train ``cfg.adapter.variant`` (or evaluate the ID model for ``id_only``), then test once."""
    from idle_ray.train.evaluate import evaluate, evaluate_adapter
    from idle_ray.train.launch import best_weights, ensure_ray, run_training
    from idle_ray.train.storage import uri

    ensure_ray()
    record = {"variant": cfg.adapter.variant, "seed": cfg.seed, "config_hash": config_hash(cfg),
              "data_fingerprint": prepared.fingerprint, "backbone": cfg.llm.backbone}
    if cfg.adapter.variant == "id_only":
        record["test"] = evaluate(cfg, prepared, "test", kind="id_model", id_artifact=artifact)
        return record
    t0 = time.time()
    name = run_name(cfg)
    result = run_training(cfg, prepared, task="adapter", run_name=name, id_artifact=artifact)
    if result.error:
        raise result.error
    ckpt = result.checkpoint
    record.update(run=name, train_seconds=round(time.time() - t0, 1), checkpoint=uri(ckpt.filesystem, ckpt.path),
                  best_val_ndcg_at_10=result.metrics.get("best_val_ndcg@10"), epochs=result.metrics.get("epoch"),
                  steps=result.metrics.get("step"), best_step=result.metrics.get("best_step"),
                  torch_threads=result.metrics.get("torch_threads"), samples_per_s=result.metrics.get("samples_per_s"))
    t1 = time.time()
    record["test"] = evaluate_adapter(cfg, prepared, "test", best_weights(result), artifact)
    record["test_seconds"] = round(time.time() - t1, 1)
    return record


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--output", default="", help="write the result JSON here")
    args, cfg = cli.parse(p, argv)
    from idle_ray.train import builders, storage
    from jobs.pretrain import pretrain

    if storage.is_uri(cfg.train.storage_path):  # a bad bucket or endpoint fails now, not after pre-training
        storage.check_uri(cfg.train.storage_path)
    prepared = builders.prepare_from_config(cfg)
    artifact, _ = pretrain(cfg, prepared)
    record = train_and_test(cfg, prepared, artifact)
    full = record["test"]["full"]
    print(f"\n{cfg.adapter.variant} on {prepared.manifest['dataset']} (seed {cfg.seed}), test, full ranking:")
    print(" ".join(f"{k} {v:.4f}" for k, v in full.items()))
    if args.output:
        from idle_ray.train.report import write_json
        write_json(args.output, record)


if __name__ == "__main__":
    cli.run_main(main)
