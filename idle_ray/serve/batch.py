"""Batch recommendations: top-K for every user (or a list of users) on Ray Data, written as Parquet.

``read shards -> samples of split "next" (the whole sequence as history) [-> prompt tokenisation]
-> Recommender actor pool (model loaded once per actor) -> write_parquet`` to a temp location,
then moved under the final name with ``manifest.json`` written last: output under ``LOCATION`` is
complete exactly when its manifest exists. ``LOCATION`` may be a folder, an NFS path or an
``s3://`` / ``gs://`` URI.

Each output row: ``user_id`` (original id), ``rank`` 1..K, ``item_id`` (original), ``title``,
``score``; one row per (user, rank), so the files load straight into a table or a key-value store.
"""
from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from idle_ray.config import ConfigError, ExperimentConfig, config_hash, experiment_from_dict, to_dict
from idle_ray.data.prepare import PreparedDataset
from idle_ray.serve.topk import Vocabulary, top_k


class Recommender:
    """``map_batches`` actor: ``next`` samples -> one row per (user, rank)."""

    def __init__(self, experiment: dict, prepared: str, kind: str, weights: str | None, id_artifact: str,
                 k: int, exclude_history: bool, threads: int = 1):
        import torch

        from idle_ray.data.prepare import load_prepared
        from idle_ray.train.evaluate import scoring_model
        torch.set_num_threads(threads)
        ds = load_prepared(prepared)
        self.model = scoring_model(experiment_from_dict(experiment), ds, kind, weights, id_artifact)
        self.vocab = Vocabulary(prepared)
        self.k, self.exclude_history = k, exclude_history

    def __call__(self, batch: dict) -> dict:
        import torch

        from idle_ray.train.contexts import to_tensors
        t = to_tensors({key: v for key, v in batch.items() if key != "seen"}, "cpu")
        with torch.no_grad():
            scores = self.model.full_sort_predict(t)
        items, values = top_k(scores, self.k, list(batch["seen"]) if self.exclude_history else None)
        keep = np.isfinite(values)  # fewer than k rankable items left for this user
        rows, ranks = np.nonzero(keep)
        return {"user_id": self.vocab.user_ids[np.asarray(batch["user"])[rows]].astype(str),
                "rank": (ranks + 1).astype(np.int32),
                "item_id": self.vocab.item_ids[items[keep]].astype(str),
                "title": self.vocab.titles[items[keep]].astype(str),
                "score": values[keep]}


def select_users(prepared: PreparedDataset, users_file: str, skip_unknown: bool, log=print) -> np.ndarray | None:
    """Dense ids of the users listed in ``users_file`` (one original id per line; a header line
    ``user_id`` is allowed), or None for every user. Unknown ids: a :class:`ConfigError` listing them,
    or (``skip_unknown``) a note and the rest."""
    if not users_file or users_file == "all":
        return None
    try:
        with open(users_file, encoding="utf-8") as f:
            wanted = [line.strip().split(",")[0] for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--users {users_file}: cannot read it ({e}); give a UTF-8 text file with one user id "
                          "per line, or --users all") from None
    if wanted and wanted[0] == "user_id":
        wanted = wanted[1:]
    vocab = Vocabulary(prepared.path)
    unknown = [u for u in wanted if u not in vocab.user_index]
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        if not skip_unknown:
            raise ConfigError(f"--users {users_file}: {len(unknown)} user id(s) not in the prepared data: {shown}. "
                              "Fix: remove them, or pass --skip-unknown to recommend for the others")
        log(f"[recommend] skipping {len(unknown)} unknown user id(s): {shown}")
    dense = sorted({vocab.user_index[u] for u in wanted if u in vocab.user_index})
    if not dense:
        raise ConfigError(f"--users {users_file}: no known user id in the file; give ids from the prepared data")
    return np.asarray(dense, dtype=np.int32)


def check_k(k: int, prepared: PreparedDataset) -> None:
    if not 1 <= k <= prepared.num_items:
        raise ConfigError(f"--top-k {k}: choose K between 1 and the number of items ({prepared.num_items})")


def recommend(cfg: ExperimentConfig, prepared: PreparedDataset, output: str, *, kind: str, k: int,
              artifact: str, weights: str | None = None, users: np.ndarray | None = None,
              exclude_history: bool = True, actors: int = 1, cpus_per_actor: float = 1.0,
              threads: int | None = None, info: dict | None = None, log=print) -> dict:
    """Top-``k`` for the ``users`` (dense ids; None: all) written under ``output``; returns the manifest."""
    import ray

    from idle_ray.data.pipeline import split_dataset
    from idle_ray.train import builders, storage

    check_k(k, prepared)
    extra = None
    if kind == "adapter":
        builders.prepare_backbone(cfg, log=log)
        extra = (builders.encode_prompts, builders.prompt_stage_kwargs(cfg, prepared))
    t0 = time.time()
    ds = split_dataset(prepared, "next", cfg.data.max_history, extra_stage=extra, shuffle=False,
                       batch_size=cfg.eval.batch_size, users=users)
    rows = ds.map_batches(
        Recommender, fn_constructor_kwargs={
            "experiment": to_dict(cfg), "prepared": str(prepared.path), "kind": kind, "weights": weights,
            "id_artifact": artifact, "k": k, "exclude_history": exclude_history,
            "threads": threads or max(1, round(cpus_per_actor))},
        batch_size=cfg.eval.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor)
    final = storage.absolute(output)
    tmp = f"{final.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    fs, tmp_path = storage.resolve(tmp)
    try:
        rows.write_parquet(tmp_path, filesystem=fs)
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(tmp_path, recursive=True))
                       if i.type == pafs.FileType.File)
        users_written = set()
        n_rows = 0
        for f in files:
            table = pq.read_table(f, filesystem=fs, columns=["user_id"])
            users_written.update(table["user_id"].to_pylist())
            n_rows += table.num_rows
        expected = len(users) if users is not None else prepared.manifest["num_users"]
        if len(users_written) != expected:
            raise RuntimeError(f"recommendations were written for {len(users_written)} users; expected {expected}")
        manifest = {"kind": kind, "variant": cfg.adapter.variant if kind == "adapter" else cfg.id_model.name,
                    "k": k, "exclude_history": exclude_history, "users": len(users_written), "rows": n_rows,
                    "files": [os.path.relpath(f, tmp_path) for f in files], "config_hash": config_hash(cfg),
                    "data_fingerprint": prepared.fingerprint, "vocab_fingerprint": prepared.manifest["vocab_fingerprint"],
                    "id_artifact": artifact, "weights": weights, "seconds": round(time.time() - t0, 1),
                    "columns": ["user_id", "rank", "item_id", "title", "score"], **(info or {})}
        _publish(fs, tmp_path, final, manifest)
    finally:
        if fs.get_file_info(tmp_path).type != pafs.FileType.NotFound:
            fs.delete_dir(tmp_path)
    log(f"[recommend] wrote top-{k} for {manifest['users']:,} users ({n_rows:,} rows) to {final} "
        f"in {manifest['seconds']:.0f} s")
    return manifest


def _publish(fs, tmp_path: str, final: str, manifest: dict) -> None:
    """Move the shards from ``tmp_path`` under ``final`` and write ``manifest.json`` last. The old
    manifest goes first, so a reader never sees a manifest beside a mix of old and new shards."""
    from idle_ray.train import storage
    _, final_path = storage.resolve(final)
    if fs.get_file_info(final_path).type != pafs.FileType.NotFound:
        manifest_path = f"{final_path}/manifest.json"
        if fs.get_file_info(manifest_path).type == pafs.FileType.File:
            fs.delete_file(manifest_path)
        fs.delete_dir(final_path)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(final_path) or ".", exist_ok=True)
        os.rename(tmp_path, final_path)  # one rename: the shards appear together
    else:
        fs.create_dir(final_path)
        for rel in manifest["files"]:
            fs.move(f"{tmp_path}/{rel}", f"{final_path}/{rel}")
    storage.write_json_in(final, "manifest.json", manifest)


def read_recommendations(location: str):
    """The recommendations under ``location`` as a pyarrow Table (raises when there is no manifest:
    the output is incomplete or absent)."""
    import pyarrow as pa

    from idle_ray.train import storage
    manifest = storage.read_json_in(storage.absolute(location), "manifest.json")
    if manifest is None:
        raise FileNotFoundError(f"{location}: no manifest.json, so no complete recommendations there")
    fs, path = storage.resolve(storage.absolute(location))
    return pa.concat_tables([pq.read_table(f"{path}/{rel}", filesystem=fs) for rel in manifest["files"]]), manifest


def local_top_k(cfg: ExperimentConfig, prepared: PreparedDataset, model, k: int, users=None,
                exclude_history: bool = True):
    """The batch job without Ray: shards read in this process, then the same samples (split
    ``next``), prompt stage, ``model`` and top-K rule, ``eval.batch_size`` users at a time. Yields
    ``(dense users, items (B, k), scores (B, k), seen)`` per batch (tests and benchmarks compare it
    with :func:`recommend`)."""
    import torch

    from idle_ray.data.pipeline import local_numpy_reader
    from idle_ray.train import builders
    from idle_ray.train.contexts import to_tensors
    prompt = None if isinstance(model, builders.IDModelTask) else builders.prompt_stage_kwargs(cfg, prepared)
    size = cfg.eval.batch_size
    for block in local_numpy_reader(prepared, "next", cfg.data.max_history):
        if users is not None:
            keep = np.isin(block["user"], users)
            block = {key: v[keep] for key, v in block.items()}
        for lo in range(0, len(block["user"]), size):
            b = {key: v[lo:lo + size] for key, v in block.items()}
            if prompt is not None:
                b = builders.encode_prompts(b, **prompt)
            with torch.no_grad():
                scores = model.full_sort_predict(to_tensors({key: v for key, v in b.items() if key != "seen"}, "cpu"))
            items, values = top_k(scores, k, list(b["seen"]) if exclude_history else None)
            yield b["user"], items, values, b["seen"]
