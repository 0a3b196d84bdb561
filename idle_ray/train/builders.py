"""Builders: the one place where config objects turn into modules (house rule 2).

Everything below this file takes plain arguments.  A *task* is what the shared worker loop
trains: an ``nn.Module`` whose ``forward(batch)`` returns ``{"loss", ...parts}``, with
``full_sort_predict(batch) -> (B, N+1)`` for evaluation and ``is_trainable(name)`` as the one
predicate for ``requires_grad``, the optimizer and the checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from pathlib import Path

import torch
from torch import nn

from idle_ray.config import ExperimentConfig
from idle_ray.data.prepare import PreparedDataset
from idle_ray.models.registry import ID_MODELS, build_id_model


class IDModelTask(nn.Module):
    """Pre-training objective of an ID model: full-softmax next-item cross-entropy."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def is_trainable(name: str) -> bool:
        return True

    def forward(self, batch) -> dict:
        history = batch["history"].long()
        if "target_seq" in batch:  # windows: a target at every position, 0 = no loss
            states = self.model.user_states(history)  # (B, T, d)
            target = batch["target_seq"].long()
            keep = target > 0
            logits = states[keep] @ self.model.item_table()[1:].T  # (M, N): padding is not a class
            loss = torch.nn.functional.cross_entropy(logits, target[keep] - 1)
        else:
            loss = self.model.calculate_loss(history, batch["target"].long())
        return {"loss": loss, "ce": loss}

    @torch.no_grad()
    def full_sort_predict(self, batch) -> torch.Tensor:
        return self.model.full_sort_predict(batch["history"].long())


def id_model_kwargs(cfg: ExperimentConfig) -> dict:
    """Constructor kwargs for ``cfg.id_model.name`` from the config, only those it accepts."""
    m = cfg.id_model
    wanted = {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_heads": m.num_heads,
              "dropout": m.dropout}
    if m.name == "caser":  # Caser's window is its own (the paper's L=5), not the history length
        wanted.update(max_len=m.caser_window, num_vertical=m.caser_vertical, num_horizontal=m.caser_horizontal)
    else:
        wanted["max_len"] = cfg.data.max_history
    if m.name == "sasrec":
        wanted["attn_dropout"] = m.dropout
    accepted = inspect.signature(ID_MODELS[m.name].__init__).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


def build_pretrain_task(cfg: ExperimentConfig, prepared: PreparedDataset) -> tuple[nn.Module, dict]:
    """The ID model to pre-train, randomly initialised from ``cfg.seed`` or, with
    ``pretrain.init_artifact``, from that artifact's weights (same model and sizes required)."""
    torch.manual_seed(cfg.seed)
    kwargs = id_model_kwargs(cfg)
    model = build_id_model(cfg.id_model.name, prepared.num_items, **kwargs)
    if cfg.pretrain.init_artifact:
        from idle_ray.models.artifact import ArtifactError, load_id_artifact
        start, meta = load_id_artifact(cfg.pretrain.init_artifact, prepared.manifest["vocab_fingerprint"])
        # compared with the constructor's defaults filled in: an artifact saved before a kwarg was passed
        # explicitly (Caser's window and filters) is the same model
        defaults = {k: v.default for k, v in inspect.signature(ID_MODELS[cfg.id_model.name].__init__).parameters.items()
                    if v.default is not inspect.Parameter.empty}
        if meta["name"] != cfg.id_model.name or {**defaults, **meta["kwargs"]} != {**defaults, **kwargs}:
            raise ArtifactError(f"{cfg.pretrain.init_artifact}: a {meta['name']} with {meta['kwargs']}, not the "
                                f"configured {cfg.id_model.name} with {kwargs}. Fix: point pretrain.init_artifact "
                                "at an artifact of this id_model")
        model.load_state_dict(start.state_dict())
        for p in model.parameters():
            p.requires_grad_(True)
    return IDModelTask(model), kwargs


def refine_layer_ids(spec: str) -> list[int] | None:
    return None if spec == "all" else [int(x) for x in spec.split(",")]


def llm_dtype(cfg: ExperimentConfig) -> torch.dtype:
    """The frozen LLM's dtype for this config on this machine (``llm.dtype``, ``auto`` resolved)."""
    from idle_ray.llm.backbone import resolve_dtype
    return resolve_dtype(cfg.llm.dtype, on_gpu=cfg.train.use_gpu and torch.cuda.is_available())


def build_adapter_task(cfg: ExperimentConfig, prepared: PreparedDataset, id_artifact: str | Path) -> nn.Module:
    """Frozen backbone + frozen ID model (from its artifact) + the adapter variant of the config."""
    from idle_ray.llm.backbone import load_backbone
    from idle_ray.models.artifact import load_id_artifact

    id_model, _ = load_id_artifact(id_artifact, prepared.manifest["vocab_fingerprint"])
    backbone = load_backbone(cfg.llm.backbone, cache_dir=cfg.llm.cache_dir or None, dtype=llm_dtype(cfg))
    return adapter_model(cfg, backbone, id_model)


def adapter_model(cfg: ExperimentConfig, backbone, id_model: nn.Module) -> nn.Module:
    """The config's adapter variant around an already loaded backbone and ID model (benchmarks
    build several adapters around one backbone)."""
    from idle_ray.adapter.model import IDLEModel

    torch.manual_seed(cfg.seed)
    a = cfg.adapter
    return IDLEModel(backbone, id_model, variant=a.variant, prompt_length=a.prompt_length,
                     projection_width=a.projection_width, refine_layers=refine_layer_ids(a.refine_layers),
                     refine_width=a.refine_bottleneck, mmd_weight=a.mmd_weight,
                     mmd_max_text_states=a.mmd_max_text_states, kv_split=kv_split(cfg), fusion=a.fusion)


def prepare_backbone(cfg: ExperimentConfig, log=print) -> None:
    """Build the backbone's local cache (de-quantised SmolLM2) here, once, before workers start:
    workers on this node then only read it; workers on other nodes build it once per node under
    the same lock (:mod:`idle_ray.build_once`)."""
    from idle_ray.llm.backbone_cache import ensure_backbone_cache
    if cfg.adapter.variant != "id_only":
        ensure_backbone_cache(cfg.llm.backbone, cfg.llm.cache_dir or None, log=log)


def kv_split(cfg: ExperimentConfig) -> bool:
    """``adapter.kv_split``: ``auto`` splits unless the workers train on a GPU."""
    if cfg.adapter.kv_split != "auto":
        return cfg.adapter.kv_split == "always"
    return not (cfg.train.use_gpu and torch.cuda.is_available())


def prompt_stage_kwargs(cfg: ExperimentConfig, prepared: PreparedDataset) -> dict:
    """Keyword arguments of the Ray Data tokenisation stage (:func:`encode_prompts`)."""
    a = cfg.adapter
    kwargs = {"backbone": cfg.llm.backbone, "cache_dir": cfg.llm.cache_dir or None,
            "template": cfg.prompt.template, "max_history": cfg.prompt.max_history,
            "max_tokens": cfg.prompt.max_tokens, "titles": prepared.item_titles(),
            "prompt_length": a.prompt_length if a.variant in ("idle", "idle_no_refine", "idle_no_mmd") else 0,
            "item_slots": a.variant == "llara"}
    # Hashed once here; the per-batch stage only looks its cached encoder up by this key.
    kwargs["cache_key"] = hashlib.sha256(json.dumps(kwargs, sort_keys=True, default=str).encode()).hexdigest()
    return kwargs


_ENCODERS: dict = {}


def encode_prompts(batch: dict, **kwargs) -> dict:
    """Ray Data stage: tokenise hard prompts (numpy in, numpy out), off the training loop.

    The :class:`PromptEncoder` (tokenizer + pre-tokenised titles) is built once per worker
    process and reused by every later batch with the same settings.
    """
    key = kwargs["cache_key"]
    encoder = _ENCODERS.get(key)
    if encoder is None:
        from idle_ray.llm.backbone import load_tokenizer
        from idle_ray.llm.prompts import PromptEncoder
        tokenizer, kind = load_tokenizer(kwargs["backbone"], cache_dir=kwargs["cache_dir"])
        encoder = _ENCODERS[key] = PromptEncoder(
            tokenizer, kwargs["template"], kwargs["prompt_length"], kwargs["max_history"], kwargs["max_tokens"],
            kwargs["titles"], kind, item_slots=kwargs["item_slots"])
    return encoder(batch)


def prepare_from_config(cfg: ExperimentConfig, log=print) -> PreparedDataset:
    """Prepare (or find in the cache) the dataset named by ``cfg.data``. Every job starts here, so it
    first refuses locations that workers on other nodes could not read (``cluster.require_shared_paths``)."""
    from idle_ray.data.prepare import prepare_dataset
    from idle_ray.train.cluster import require_shared_paths
    require_shared_paths(cfg)
    d = cfg.data
    return prepare_dataset(d.dataset, d.output_dir, path=d.path, items_path=d.items_path,
                           min_user_interactions=d.min_user_interactions,
                           min_item_interactions=d.min_item_interactions, rows_per_shard=d.rows_per_shard,
                           train_targets_per_user=d.train_targets_per_user, min_rating=d.min_rating,
                           columns=vars(d.columns), delimiter=d.delimiter, encoding=d.encoding, engine=d.engine,
                           build_dir=d.build_dir, log=log)


def id_artifact_dir(cfg: ExperimentConfig, prepared: PreparedDataset) -> Path | str:
    """Where the pre-trained ID model lives: ``id_model.artifact`` or a name derived from the run under
    ``id_model.artifacts_dir`` (a local folder as an absolute path, or a URI)."""
    from idle_ray.locations import is_uri, join
    m = cfg.id_model
    if m.artifact:
        return m.artifact if is_uri(m.artifact) else Path(m.artifact).expanduser().resolve()
    from idle_ray.config import config_hash, id_model_settings
    settings = id_model_settings(vars(m))  # what is trained, not where
    key = config_hash({"id_model": {**settings, "artifact": ""}, "pretrain": vars(cfg.pretrain),
                       "max_history": cfg.data.max_history, "seed": cfg.seed})
    name = f"{prepared.manifest['dataset']}-{m.name}-s{cfg.seed}-{key}"
    if is_uri(m.artifacts_dir):
        return join(m.artifacts_dir, "id_models", name)
    return Path(m.artifacts_dir).expanduser().resolve() / "id_models" / name


def sibling_artifact(cfg: ExperimentConfig, suffix: str) -> ExperimentConfig:
    """``cfg`` for a second ID model beside the base: with an explicit ``id_model.artifact`` folder, the
    folder ``<artifact>-<suffix>`` (else the base would be reused for it); otherwise unchanged (the
    derived folder name already differs by the pre-training settings)."""
    if not cfg.id_model.artifact:
        return cfg
    return dataclasses.replace(cfg, id_model=dataclasses.replace(
        cfg.id_model, artifact=f"{cfg.id_model.artifact.rstrip('/')}-{suffix}"))


def all_targets_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` for the ID model trained on every training target beside the adapter's held-out base
    (``pretrain.holdout_targets`` > 0): the 'id_only_all' row's model and the test-time anchor."""
    return sibling_artifact(dataclasses.replace(cfg, pretrain=dataclasses.replace(
        cfg.pretrain, holdout_targets=0, holdout_window=0)), "all")


def uses_anchor(cfg: ExperimentConfig) -> bool:
    """Whether the adapter is scored with the test-time anchor (``adapter.anchor_weight``)."""
    a = cfg.adapter
    return (a.anchor_weight > 0 and cfg.pretrain.holdout_targets > 0 and a.fusion == "residual"
            and a.variant in ("idle", "idle_no_refine", "idle_no_mmd"))


def anchor_artifact_dir(cfg: ExperimentConfig, prepared: PreparedDataset) -> Path | str:
    return id_artifact_dir(all_targets_config(cfg), prepared)


def train_selection(cfg: ExperimentConfig, pretrain: bool) -> tuple[int, object]:
    """``(targets_per_user, holdout)`` of a task's training samples (``split_dataset``'s arguments):
    the ID model's pre-training leaves out ``pretrain.holdout_*``, the adapter trains on exactly
    those targets (its last ``data.train_targets_per_user`` when ``holdout_window`` is 0)."""
    from idle_ray.data.samples import Holdout
    p = cfg.pretrain
    if p.holdout_window and p.holdout_targets:
        return 0, Holdout(p.holdout_targets, p.holdout_window, seed=cfg.seed, adapter=not pretrain)
    return (0 if pretrain else cfg.data.train_targets_per_user), (p.holdout_targets if pretrain else 0)
