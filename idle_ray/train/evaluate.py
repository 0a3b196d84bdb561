"""Distributed, streamed evaluation on Ray Data: an actor pool scores batches of users.

Each actor builds the model once (frozen parts from their sources, trainable weights from a
safetensors file) and maps a batch of samples to per-user 0-based ranks under each protocol;
the driver turns ranks into metrics. Ranks per user (not averages) come back, so results are
exact however the users are batched or spread over actors.
"""
from __future__ import annotations

import os

import numpy as np
import ray

from idle_ray.config import ExperimentConfig, experiment_from_dict, to_dict
from idle_ray.data.pipeline import split_dataset
from idle_ray.data.prepare import PreparedDataset
from idle_ray.eval.metrics import finalize, metric_sums
from idle_ray.locations import exists, join
from idle_ray.results.records import ranks_entry


def scoring_model(cfg: ExperimentConfig, prepared, kind: str, weights: str | None, id_artifact: str | None):
    """The model that scores users, in eval mode: ``kind`` "id_model" (the artifact) or "adapter"
    (the config's variant: frozen parts from their sources, trainable weights from ``weights``)."""
    from idle_ray.train import builders
    if kind == "id_model":
        from idle_ray.models.artifact import load_id_artifact
        model, _ = load_id_artifact(id_artifact, prepared.manifest["vocab_fingerprint"])
        model = builders.IDModelTask(model)
    else:
        model = builders.build_adapter_task(cfg, prepared, id_artifact)
        if weights:
            from idle_ray.train.weights import load_weights
            model.load_adapter_state_dict(load_weights(weights))
        if builders.uses_anchor(cfg):
            model.set_anchor(anchor_model(cfg, prepared), cfg.adapter.anchor_weight)
    return model.eval()


def anchor_model(cfg: ExperimentConfig, prepared):
    """The test-time anchor of ``cfg``'s adapter (``adapter.anchor_weight``): its ID model trained on
    every target, loaded from its artifact (:func:`idle_ray.train.builders.anchor_artifact_dir`)."""
    from idle_ray.models.artifact import load_id_artifact
    from idle_ray.train import builders
    path = builders.anchor_artifact_dir(cfg, prepared)
    if not exists(join(str(path), "model.json")):
        from idle_ray.config import ConfigError
        raise ConfigError(f"field 'adapter.anchor_weight' = {cfg.adapter.anchor_weight:g} scores the adapter on top "
                          f"of its ID model trained on every target, but {path} does not exist. Fix: run "
                          f"jobs/main.py with this config (it pre-trains it), or set adapter.anchor_weight=0")
    model, _ = load_id_artifact(path, prepared.manifest["vocab_fingerprint"])
    return builders.IDModelTask(model)


class Scorer:
    """``map_batches`` actor: samples -> ``{user, rank_<protocol>...}``."""

    def __init__(self, experiment: dict, prepared: str, kind: str, weights: str | None, id_artifact: str | None,
                 protocols: list, seed: int, threads: int = 1):
        import torch

        from idle_ray.data.prepare import load_prepared
        torch.set_num_threads(threads)
        self.model = scoring_model(experiment_from_dict(experiment), load_prepared(prepared), kind, weights,
                                   id_artifact)
        self.protocols, self.seed = protocols, seed

    def __call__(self, batch: dict) -> dict:
        import torch

        from idle_ray.eval.protocols import protocol_ranks
        from idle_ray.train.contexts import to_tensors
        t = to_tensors({k: v for k, v in batch.items() if k != "seen"}, "cpu")
        with torch.no_grad():
            scores = self.model.full_sort_predict(t).float()
        out = {"user": batch["user"]}
        for p in self.protocols:
            out[f"rank_{p}"] = protocol_ranks(p, scores, t["target"].long(), list(batch["seen"]),
                                              user_ids=batch["user"], seed=self.seed).numpy()
        return out


def evaluate(cfg: ExperimentConfig, prepared: PreparedDataset, split: str, *, kind: str,
             weights: str | None = None, id_artifact: str | None = None, protocols: list | None = None,
             actors: int = 1, cpus_per_actor: float = 1.0, threads: int | None = None, extra_stage=None) -> dict:
    """Metrics on ``split`` ({protocol: {metric: value}}, plus ``users`` and the per-user ``ranks``
    of :func:`idle_ray.results.records.ranks_entry`) computed on Ray.

    ``kind``: "id_model" (the artifact's model) or "adapter" (the config's variant with ``weights``,
    a path or URI).
    """
    protocols = protocols or list(cfg.eval.protocols)
    if kind == "adapter":
        from idle_ray.train.builders import prepare_backbone
        prepare_backbone(cfg)
    ds = split_dataset(prepared, split, cfg.data.max_history, extra_stage=extra_stage, shuffle=False,
                       batch_size=cfg.eval.batch_size, max_user=cfg.eval.max_users)
    ranks = ds.map_batches(
        Scorer, fn_constructor_kwargs={"experiment": to_dict(cfg), "prepared": str(prepared.path), "kind": kind,
                                       "weights": weights, "id_artifact": id_artifact, "protocols": protocols,
                                       "seed": cfg.seed, "threads": threads or max(1, round(cpus_per_actor))},
        batch_size=cfg.eval.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor)
    collected = {p: [] for p in protocols}
    users = []
    for b in ranks.iter_batches(batch_size=None, batch_format="numpy"):
        users.append(b["user"])
        for p in protocols:
            collected[p].append(b[f"rank_{p}"])
    users = np.concatenate(users)
    expected = prepared.manifest["splits"][split]
    if cfg.eval.max_users:
        expected = min(expected, cfg.eval.max_users)
    if len(np.unique(users)) != len(users) or len(users) != expected:
        raise RuntimeError(f"evaluation saw {len(users)} rows for {len(np.unique(users))} users; expected "
                           f"{expected} users once each")
    ranks = {p: np.concatenate(collected[p]) for p in protocols}
    out = {p: finalize(metric_sums(ranks[p])) for p in protocols}
    out["users"] = int(len(users))
    out["ranks"] = ranks_entry(users, ranks)  # per user, for paired comparisons (idle_ray.results)
    return out


def evaluate_adapter(cfg: ExperimentConfig, prepared: PreparedDataset, split: str, weights: str,
                     id_artifact: str) -> dict:
    """:func:`evaluate` of the config's adapter with ``weights``: prompts tokenised in the Ray Data
    stage, one scoring actor with all the node's cores (the frozen LLM is large, the users few)."""
    from idle_ray.train.builders import encode_prompts, prompt_stage_kwargs
    return evaluate(cfg, prepared, split, kind="adapter", weights=weights, id_artifact=id_artifact,
                    extra_stage=(encode_prompts, prompt_stage_kwargs(cfg, prepared)),
                    actors=1, cpus_per_actor=1.0, threads=os.cpu_count() or 1)
