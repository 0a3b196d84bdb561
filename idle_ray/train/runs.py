"""Runs as the jobs make them: pre-train (or reuse) the ID model, train and test one adapter variant,
evaluate saved weights; each returns its result record (:mod:`idle_ray.results.records`)."""
from __future__ import annotations

import os
import time

from idle_ray.config import ConfigError, ExperimentConfig, config_hash
from idle_ray.data.prepare import PreparedDataset
from idle_ray.results.records import run_record


def run_name(cfg: ExperimentConfig) -> str:
    """The Train run name of ``cfg``'s adapter variant: rerunning the same config resumes it."""
    return f"{cfg.name}-{cfg.adapter.variant}-s{cfg.seed}-{config_hash(cfg)[:8]}"


def pretrain(cfg: ExperimentConfig, prepared: PreparedDataset, log=print) -> tuple[str, dict]:
    """Train (or resume / reuse) the ID model; returns (artifact folder, its metadata).

    Built once (house rule 14): a complete artifact is reused; otherwise one process trains it under
    the artifact's file lock while concurrent jobs with the same settings wait, then reuse it."""
    from idle_ray.build_once import BuildLock, is_complete
    from idle_ray.locations import exists, join
    from idle_ray.models.artifact import read_id_metadata
    from idle_ray.train import builders

    out = builders.id_artifact_dir(cfg, prepared)
    explicit = bool(cfg.id_model.artifact) and exists(join(str(out), "model.json"))  # the user's own, as it is
    if explicit or is_complete(out):
        log(f"[pretrain] reusing {out}")
        return str(out), read_id_metadata(out)
    with BuildLock(out, "pretrain", log):
        if is_complete(out):
            log(f"[pretrain] reusing {out} (trained by another process meanwhile)")
            return str(out), read_id_metadata(out)
        return _pretrain_locked(cfg, prepared, out, log)


def _pretrain_locked(cfg: ExperimentConfig, prepared: PreparedDataset, out, log) -> tuple[str, dict]:
    from idle_ray.locations import basename
    from idle_ray.models.artifact import read_id_metadata, save_id_artifact
    from idle_ray.train import builders
    from idle_ray.train.launch import best_weights, ensure_ray, run_training
    from idle_ray.train.weights import load_weights

    ensure_ray()
    t0 = time.time()
    result = run_training(cfg, prepared, task="pretrain", run_name=basename(out))
    if result.error:
        raise result.error
    task, kwargs = builders.build_pretrain_task(cfg, prepared)
    task.load_state_dict(load_weights(best_weights(result)))
    metrics = result.metrics or {}
    save_id_artifact(task.model, out, name=cfg.id_model.name, kwargs=kwargs,
                     vocab_fingerprint=prepared.manifest["vocab_fingerprint"], data_fingerprint=prepared.fingerprint,
                     extra={"seed": cfg.seed, "config_hash": config_hash(cfg), "train_seconds": time.time() - t0,
                            "best_val_ndcg@10": metrics.get("best_val_ndcg@10"), "epochs": metrics.get("epoch"),
                            "best_epoch": metrics.get("best_epoch"), "wall_seconds": metrics.get("wall_seconds")})
    log(f"[pretrain] exported {out}")
    return str(out), read_id_metadata(out)


def pretrain_and_test(cfg: ExperimentConfig) -> tuple[PreparedDataset, dict]:
    """Prepare the data, :func:`pretrain` the ID model and test it once; (prepared, record).

    The record carries the pre-training's ``epochs``, ``best_epoch`` (the early-stopping choice) and
    ``wall_seconds`` (its epochs, validation included, summed across resumes) from the artifact."""
    from idle_ray.train import builders
    from idle_ray.train.evaluate import evaluate
    from idle_ray.train.launch import ensure_ray

    prepared = builders.prepare_from_config(cfg)
    artifact, meta = pretrain(cfg, prepared)
    ensure_ray()
    test = evaluate(cfg, prepared, "test", kind="id_model", id_artifact=artifact)
    return prepared, {"model": cfg.id_model.name, "seed": cfg.seed, "config_hash": config_hash(cfg),
                      "data_fingerprint": prepared.fingerprint, "artifact": artifact,
                      "best_val_ndcg@10": meta.get("best_val_ndcg@10"), "epochs": meta.get("epochs"),
                      "best_epoch": meta.get("best_epoch"), "wall_seconds": meta.get("wall_seconds"), "test": test}


def train_and_test(cfg: ExperimentConfig, prepared: PreparedDataset, artifact: str, log=print,
                   test_artifact: str | None = None, trained: dict | None = None) -> dict:
    """Train ``cfg.adapter.variant`` (or evaluate the ID model for ``id_only``), then test once.

    ``test_artifact``: test the trained adapter on this ID model instead (a refit of ``artifact``);
    the record then holds the validation of both, every user (``valid_base``, ``valid``).
    ``trained``: {run name: Train result} of the runs this job has finished already; a row whose run
    is among them (the same adapter scored another way) takes its result instead of relaunching the
    finished run (a Train controller, workers and a restore that train nothing), and adds its own."""
    from idle_ray.train import builders
    from idle_ray.train.evaluate import evaluate, evaluate_adapter
    from idle_ray.train.launch import best_weights, ensure_ray, run_training
    from idle_ray.train.storage import uri

    ensure_ray()
    record = run_record(variant=cfg.adapter.variant, seed=cfg.seed, config_hash=config_hash(cfg),
                        data_fingerprint=prepared.fingerprint, backbone=cfg.llm.backbone)
    if cfg.adapter.variant == "id_only":
        record["test"] = evaluate(cfg, prepared, "test", kind="id_model", id_artifact=artifact)
        return record
    record["llm_dtype"] = str(builders.llm_dtype(cfg)).removeprefix("torch.")  # as resolved on the driver
    t0 = time.time()
    name = run_name(cfg)
    result = (trained or {}).get(name)
    if result is None:
        result = run_training(cfg, prepared, task="adapter", run_name=name, id_artifact=artifact)
        if result.error:
            raise result.error
        if trained is not None:
            trained[name] = result
    ckpt = result.checkpoint
    record.update(run=name, train_seconds=round(time.time() - t0, 1), checkpoint=uri(ckpt.filesystem, ckpt.path),
                  best_val_ndcg_at_10=result.metrics.get("best_val_ndcg@10"), epochs=result.metrics.get("epoch"),
                  steps=result.metrics.get("step"), best_step=result.metrics.get("best_step"),
                  torch_threads=result.metrics.get("torch_threads"), samples_per_s=result.metrics.get("samples_per_s"))
    t1 = time.time()
    if test_artifact:
        record["valid_base"] = evaluate_adapter(cfg, prepared, "valid", best_weights(result), artifact)
        record["valid"] = evaluate_adapter(cfg, prepared, "valid", best_weights(result), test_artifact)
        record["test_artifact"] = test_artifact
        log(f"[refit] validation NDCG@10 on every user: base {record['valid_base']['full']['ndcg@10']:.4f}, "
            f"refit {record['valid']['full']['ndcg@10']:.4f}")
        artifact = test_artifact
    record["test"] = evaluate_adapter(cfg, prepared, "test", best_weights(result), artifact)
    record["test_seconds"] = round(time.time() - t1, 1)
    from idle_ray.train.builders import anchor_artifact_dir, uses_anchor
    if uses_anchor(cfg):
        record["anchor"] = {"artifact": str(anchor_artifact_dir(cfg, prepared)), "weight": cfg.adapter.anchor_weight}
    return record


def pretrain_train_and_test(cfg: ExperimentConfig) -> tuple[PreparedDataset, dict]:
    """The train job: check the storage, prepare, :func:`pretrain` if needed, :func:`train_and_test`."""
    from idle_ray.train import builders, storage

    if storage.is_uri(cfg.train.storage_path):  # a bad bucket or endpoint fails now, not after pre-training
        storage.check_uri(cfg.train.storage_path)
    prepared = builders.prepare_from_config(cfg)
    artifact, _ = pretrain(cfg, prepared)
    return prepared, train_and_test(cfg, prepared, artifact)


def evaluation_inputs(cfg: ExperimentConfig, kind: str = "adapter", split: str = "test", weights: str = "",
                      run: str = "") -> dict:
    """Check what an evaluation would read, before any model or Ray starts; the record begun.

    ``kind`` "adapter": ``weights`` (path or URI), else the best weights of the run named ``run``
    (default: :func:`run_name` of ``cfg``); "id_model": the ID-model artifact. Raises
    :class:`~idle_ray.models.artifact.ArtifactError` (or ``WeightsError``, ``ConfigError``) naming
    the file, the fields and the fix."""
    from idle_ray.models.artifact import load_id_artifact
    from idle_ray.train import builders
    from idle_ray.train.weights import check_adapter_weights, run_best_weights

    if kind == "id_model" and (weights or run):
        raise ConfigError("--weights and --run name adapter weights; --kind id_model evaluates the artifact "
                          "of id_model.artifact (or of this config's pre-training run)")
    prepared = builders.prepare_from_config(cfg)
    artifact = str(builders.id_artifact_dir(cfg, prepared))
    record = {"kind": kind, "split": split, "seed": cfg.seed, "config_hash": config_hash(cfg),
              "data_fingerprint": prepared.fingerprint, "id_artifact": artifact}
    if kind == "adapter":
        run = run or ("" if weights else run_name(cfg))
        weights = weights or run_best_weights(cfg.train.storage_path, run)
        check_adapter_weights(weights, cfg, prepared, artifact)
        record.update(variant=cfg.adapter.variant, backbone=cfg.llm.backbone, run=run, weights=weights)
    load_id_artifact(artifact, prepared.manifest["vocab_fingerprint"])  # exists, same item ids
    return {"prepared": prepared, "artifact": artifact, "record": record}


def evaluate_saved(cfg: ExperimentConfig, kind: str = "adapter", split: str = "test", weights: str = "",
                   run: str = "") -> tuple[dict, str, PreparedDataset]:
    """The evaluate job: :func:`evaluation_inputs`, then ``split`` on Ray; (record, a label for its
    file, the prepared data)."""
    from idle_ray.train.evaluate import evaluate, evaluate_adapter
    from idle_ray.train.launch import ensure_ray

    inputs = evaluation_inputs(cfg, kind, split, weights, run)
    prepared, artifact, record = inputs["prepared"], inputs["artifact"], inputs["record"]
    ensure_ray()
    t0 = time.time()
    if kind == "id_model":
        metrics = evaluate(cfg, prepared, split, kind="id_model", id_artifact=artifact)
        label = os.path.basename(artifact)
    else:
        metrics = evaluate_adapter(cfg, prepared, split, record["weights"], artifact)
        label = record["run"] or f"{cfg.name}-{cfg.adapter.variant}"
    record.update({split: metrics, "seconds": round(time.time() - t0, 1)})
    return record, label, prepared
