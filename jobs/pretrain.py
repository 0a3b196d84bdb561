"""Pre-train an ID sequential model (SASRec / GRU4Rec / Caser) on Ray Train, export it, test it once.

    python jobs/pretrain.py --config configs/pretrain_sasrec_ml100k.yaml
    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/pretrain_sasrec_ml1m.yaml
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402
from idle_ray.config import config_hash  # noqa: E402


def pretrain(cfg, prepared, log=print) -> tuple[str, dict]:
    """Train (or resume / reuse) the ID model; returns (artifact folder, its metadata)."""
    from idle_ray.build_once import BuildLock, is_complete
    from idle_ray.models.artifact import read_id_metadata
    from idle_ray.train import builders

    out = builders.id_artifact_dir(cfg, prepared)
    explicit = bool(cfg.id_model.artifact) and (out / "model.json").is_file()  # the user's own, as it is
    if explicit or is_complete(out):
        log(f"[pretrain] reusing {out}")
        return str(out), read_id_metadata(out)
    with BuildLock(out, "pretrain", log):  # a concurrent job with the same settings waits, then reuses
        if is_complete(out):
            log(f"[pretrain] reusing {out} (trained by another process meanwhile)")
            return str(out), read_id_metadata(out)
        return _pretrain_locked(cfg, prepared, out, log)


def _pretrain_locked(cfg, prepared, out, log) -> tuple[str, dict]:
    from idle_ray.models.artifact import read_id_metadata, save_id_artifact
    from idle_ray.train import builders
    from idle_ray.train.launch import best_weights, ensure_ray, run_training
    from idle_ray.train.weights import load_weights

    ensure_ray()
    t0 = time.time()
    result = run_training(cfg, prepared, task="pretrain", run_name=f"{out.name}")
    if result.error:
        raise result.error
    task, kwargs = builders.build_pretrain_task(cfg, prepared)
    task.load_state_dict(load_weights(best_weights(result)))
    metrics = result.metrics or {}
    save_id_artifact(task.model, out, name=cfg.id_model.name, kwargs=kwargs,
                     vocab_fingerprint=prepared.manifest["vocab_fingerprint"], data_fingerprint=prepared.fingerprint,
                     extra={"seed": cfg.seed, "config_hash": config_hash(cfg), "train_seconds": time.time() - t0,
                            "best_val_ndcg@10": metrics.get("best_val_ndcg@10"), "epochs": metrics.get("epoch")})
    log(f"[pretrain] exported {out}")
    return str(out), read_id_metadata(out)


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--output", default="", help="write the test metrics JSON here")
    args, cfg = cli.parse(p, argv)
    from idle_ray.train import builders
    from idle_ray.train.evaluate import evaluate
    from idle_ray.train.launch import ensure_ray

    prepared = builders.prepare_from_config(cfg)
    artifact, meta = pretrain(cfg, prepared)
    ensure_ray()
    test = evaluate(cfg, prepared, "test", kind="id_model", id_artifact=artifact)
    record = {"model": cfg.id_model.name, "seed": cfg.seed, "config_hash": config_hash(cfg),
              "data_fingerprint": prepared.fingerprint, "artifact": artifact,
              "best_val_ndcg@10": meta.get("best_val_ndcg@10"), "test": test}
    print(f"\n{cfg.id_model.name} on {prepared.manifest['dataset']} (seed {cfg.seed}), test, full ranking:")
    print(" ".join(f"{k} {v:.4f}" for k, v in test["full"].items()))
    if args.output:
        from idle_ray.train.report import write_json
        write_json(args.output, record)


if __name__ == "__main__":
    cli.run_main(main)
