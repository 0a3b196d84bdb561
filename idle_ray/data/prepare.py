"""Preprocessing: raw interactions -> sharded Parquet sequences + vocabulary + manifest.

Steps (DESIGN section 2): drop exact duplicate rows; iterated k-core filter on users and items;
chronological order per user with a stable tie-break (input file order); dense id remapping
(items ``1..N``, users ``1..U``; id 0 is padding); leave-one-out split implied by position
(last item = test target, second-to-last = valid target, the rest = training targets).

Layout of a prepared dataset folder (written to a temp folder and renamed, so a failure never
leaves a partial dataset; an existing folder with the same fingerprint is a cache hit). With an
``s3://`` / ``gs://`` ``output_dir`` the folder is built locally and uploaded, completeness marker
last (:mod:`idle_ray.build_once`), and every reader opens it there: Ray Data read tasks and workers
on any node, never the driver's disk::

    <output_dir>/<dataset>-<fingerprint12>/
        manifest.json              schema version, fingerprint, statistics, split sizes, paths
        sequences/part-00000.parquet   user int32, items list<int32>, timestamps list<int64>
        vocab/items.parquet        item int32, original_id string, title string
        vocab/users.parquet        user int32, original_id string
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from idle_ray import locations
from idle_ray.build_once import BuildLock, build_locked, is_complete
from idle_ray.data import readers
from idle_ray.data.inputs import fingerprint_files, input_files
from idle_ray.data.readers import DataError
from idle_ray.locations import SHARED_STORAGE_ENV
from idle_ray.data.sequences import (SEQUENCE_SCHEMA, Content, check_filtered, check_rating_kept, check_titles,
                                     natural_order, sorted_sequences, write_shards)

SCHEMA_VERSION = 1
ITEM_SCHEMA = pa.schema([("item", pa.int32()), ("original_id", pa.string()), ("title", pa.string())])
USER_SCHEMA = pa.schema([("user", pa.int32()), ("original_id", pa.string())])
DEFAULT_COLUMNS = {"user": "user_id", "item": "item_id", "timestamp": "timestamp", "title": "title", "rating": "rating"}
ENGINES = ("local", "ray", "memory")


@dataclass
class PreparedDataset:
    path: Path | str  # a local folder, or the URI of one (s3://, gs://)
    manifest: dict

    def file(self, *parts: str) -> Path | str:
        """A file or folder of the dataset, in the form of ``path``."""
        return self.path.joinpath(*parts) if isinstance(self.path, Path) else locations.join(self.path, *parts)

    @property
    def shard_files(self) -> list[str]:
        """The sequence shards, from the manifest (the files it was verified with)."""
        return [str(self.file(*name.split("/"))) for name in self.manifest["shards"]]

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def sequences_dir(self) -> Path | str:
        return self.file("sequences")

    def item_titles(self) -> list[str]:
        """Titles indexed by dense item id (index 0 = padding, empty title)."""
        t = pq.read_table(str(self.file("vocab", "items.parquet")))
        titles = [""] * (self.num_items + 1)
        for i, title in zip(t["item"].to_pylist(), t["title"].to_pylist()):
            titles[i] = title
        return titles


def k_core(df: pd.DataFrame, min_user: int, min_item: int) -> pd.DataFrame:
    """Iterate user/item count filters until both hold (or nothing is left)."""
    while True:
        uc = df["user_id"].map(df["user_id"].value_counts())
        ic = df["item_id"].map(df["item_id"].value_counts())
        keep = (uc >= min_user) & (ic >= min_item)
        if keep.all():
            return df
        df = df[keep]


def _stats(lengths: np.ndarray, n_items: int) -> dict:
    n_users, n_inter = len(lengths), int(lengths.sum())
    pct = np.percentile(lengths, [5, 25, 50, 75, 95]) if n_users else [0] * 5
    return {
        "users": n_users, "items": n_items, "interactions": n_inter,
        "density": n_inter / max(1, n_users * n_items),
        "seq_len": {"min": int(lengths.min()) if n_users else 0,
                    **{f"p{q}": float(v) for q, v in zip((5, 25, 50, 75, 95), pct)},
                    "max": int(lengths.max()) if n_users else 0, "mean": float(lengths.mean()) if n_users else 0.0},
    }


def train_sample_count(lengths: np.ndarray, targets_per_user: int) -> int:
    """Training targets are positions 1..n-3 of each sequence (n-3 per user), optionally capped."""
    per_user = np.maximum(lengths - 3, 0)
    if targets_per_user > 0:
        per_user = np.minimum(per_user, targets_per_user)
    return int(per_user.sum())


def prepare_dataset(dataset: str, output_dir: str | Path, *, path: str = "", items_path: str = "",
                    min_user_interactions: int = 5, min_item_interactions: int = 5,
                    rows_per_shard: int = 500, train_targets_per_user: int = 0,
                    min_rating: float | None = None, columns: dict | None = None,
                    delimiter: str = ",", encoding: str = "utf-8", engine: str = "local",
                    chunk_rows: int = 1_000_000, partitions: int = 0, build_dir: str = "",
                    log=print) -> PreparedDataset:
    """Read, filter, split and write a dataset; a cache hit returns the existing folder.

    ``min_rating``: keep rows rated >= it (before duplicate removal and k-core, as RecBole's
    ``val_interval``); ``columns``: ``data.columns`` (the names in the user's own files);
    ``delimiter`` / ``encoding``: ``data.delimiter`` / ``data.encoding`` of the user's CSV and atomic files.
    ``engine``: ``data.engine``, "local" (out of core, :mod:`idle_ray.data.prepare_local`: input read in
    chunks of ``chunk_rows`` rows, ``partitions`` spill files, 0: from the input size), "ray" (the local
    engine's passes as Ray tasks, :mod:`idle_ray.data.prepare_ray`) or "memory" (the whole log in pandas,
    the reference the local engine is tested against). All write the same folder, so the engine is not
    part of the fingerprint. ``build_dir``: ``data.build_dir``, where an ``s3://`` / ``gs://`` output is
    built before its upload."""
    if engine not in ENGINES:
        raise DataError("<config>", "data.engine", f"unknown engine {engine!r}", f"use one of {', '.join(ENGINES)}")
    files = input_files(dataset, path, items_path)
    settings = {"dataset": dataset, "min_user": min_user_interactions, "min_item": min_item_interactions,
                "rows_per_shard": rows_per_shard, "train_targets_per_user": train_targets_per_user,
                "schema_version": SCHEMA_VERSION}
    if min_rating is not None:  # only when set, so the fingerprints of existing datasets stay
        settings["min_rating"] = float(min_rating)
    renamed = {k: v for k, v in (columns or {}).items() if v != DEFAULT_COLUMNS.get(k)}
    if renamed and dataset in ("atomic", "csv", "parquet"):
        settings["columns"] = dict(sorted(renamed.items()))
    # Only when not the default, so the fingerprints of existing datasets stay.
    if delimiter != "," and dataset == "csv":
        settings["delimiter"] = delimiter
    if encoding.lower().replace("_", "-") not in ("utf-8", "utf8") and dataset in ("atomic", "csv"):
        settings["encoding"] = encoding
    fp = hashlib.sha256((fingerprint_files(files) + json.dumps(settings, sort_keys=True)).encode()).hexdigest()
    name = f"{dataset}-{fp[:12]}"
    # absolute: Ray workers run in other folders
    final = locations.join(output_dir, name) if locations.is_uri(output_dir) else \
        Path(output_dir).expanduser().resolve() / name
    if is_complete(final):
        log(f"[prepare] cache hit: {final}")
        return load_prepared(final)
    with BuildLock(final, "prepare", log):  # one process prepares; concurrent jobs wait, then hit
        if is_complete(final):
            log(f"[prepare] cache hit: {final} (prepared by another process meanwhile)")
            return load_prepared(final)
        # Parsed only on a cache miss (the fingerprint above hashed the files' bytes).
        read_args = {"dataset": dataset, "path": path, "columns": columns, "rating": min_rating is not None,
                     "delimiter": delimiter, "encoding": encoding}

        def write(tmp: Path) -> None:
            if engine == "local":
                from idle_ray.data.prepare_local import prepare_out_of_core
                content = prepare_out_of_core(tmp, read_args, items_path, files, min_rating, min_user_interactions,
                                              min_item_interactions, rows_per_shard, log, chunk_rows, partitions)
            elif engine == "ray":
                from idle_ray.data.prepare_ray import prepare_on_ray
                content = prepare_on_ray(tmp, read_args, items_path, files, min_rating, min_user_interactions,
                                         min_item_interactions, rows_per_shard, log, chunk_rows, partitions,
                                         shared_tmp=bool(build_dir) if locations.is_uri(final)
                                         else bool(os.environ.get(SHARED_STORAGE_ENV)))
            else:
                content = _prepare_in_memory(tmp, read_args, items_path, files, min_rating, min_user_interactions,
                                             min_item_interactions, rows_per_shard, log)
            _write_vocab_and_manifest(tmp, content, dataset, files, settings, fp, train_targets_per_user)

        build_locked(final, write, what="prepare", log=log, build_dir=build_dir)  # the caller holds the lock
        return load_prepared(final)


def _prepare_in_memory(tmp: Path, read_args: dict, items_path: str, files: list[Path], min_rating,
                       min_user: int, min_item: int, rows_per_shard: int, log) -> Content:
    """The whole log in pandas (``data.engine: memory``): about 0.25 GiB per million rows."""
    inter, items, _ = readers.read_source(**read_args, items_path=items_path)
    raw_stats = {"users": int(inter["user_id"].nunique()), "items": int(inter["item_id"].nunique()),
                 "interactions": int(len(inter))}
    log(f"[prepare] {read_args['dataset']}: {raw_stats['users']:,} users, {raw_stats['items']:,} items, "
        f"{raw_stats['interactions']:,} interactions before filtering")
    check_titles(items, set(inter["item_id"]), read_args["dataset"], items_path or str(files[-1]))
    rating_dropped = 0
    if min_rating is not None:
        keep = inter["rating"].to_numpy() >= min_rating
        rating_dropped = int((~keep).sum())
        inter = inter[keep].drop(columns="rating")
        log(f"[prepare] kept {len(inter):,} interactions rated >= {min_rating:g} (dropped {rating_dropped:,})")
        check_rating_kept(len(inter), min_rating, files[0])
    n0 = len(inter)
    inter = inter.drop_duplicates(keep="first")
    dropped_dups = n0 - len(inter)
    if dropped_dups:
        log(f"[prepare] dropped {dropped_dups:,} exact duplicate rows")
    inter = k_core(inter, min_user, min_item)
    check_filtered(inter["user_id"].value_counts().to_numpy(), min_user, min_item, files[0])
    # Dense ids. The stable sort keeps file order for equal timestamps (the tie-break).
    user_order = natural_order(inter["user_id"].to_numpy())
    item_order = natural_order(inter["item_id"].to_numpy())
    user_idx = pd.Index(user_order).get_indexer(inter["user_id"]) + 1
    item_idx = pd.Index(item_order).get_indexer(inter["item_id"]) + 1
    users, offsets, item_col, ts_col = sorted_sequences(user_idx.astype(np.int32), item_idx.astype(np.int32),
                                                        inter["timestamp"].to_numpy())
    (tmp / "sequences").mkdir()
    shards = write_shards(tmp / "sequences", 0, users, offsets, item_col, ts_col, rows_per_shard)
    return Content(user_order, item_order, np.diff(offsets), raw_stats, rating_dropped, dropped_dups, shards, items)


def _write_vocab_and_manifest(tmp: Path, c: Content, dataset: str, files: list[Path], settings: dict, fp: str,
                              train_targets_per_user: int) -> None:
    (tmp / "vocab").mkdir()
    titles = dict(zip(c.items["item_id"], c.items["title"])) if c.items is not None else {}
    pq.write_table(pa.Table.from_pydict({
        "item": np.arange(1, len(c.item_order) + 1, dtype=np.int32),
        "original_id": [str(x) for x in c.item_order],
        "title": [titles.get(x, str(x)) for x in c.item_order]}, schema=ITEM_SCHEMA),
        tmp / "vocab" / "items.parquet")
    pq.write_table(pa.Table.from_pydict({
        "user": np.arange(1, len(c.user_order) + 1, dtype=np.int32),
        "original_id": [str(x) for x in c.user_order]}, schema=USER_SCHEMA), tmp / "vocab" / "users.parquet")
    vocab_fp = hashlib.sha256("\n".join(map(str, c.item_order)).encode()).hexdigest()[:16]
    n_users = len(c.user_order)
    manifest = {
        "schema_version": SCHEMA_VERSION, "dataset": dataset, "fingerprint": fp,
        "vocab_fingerprint": vocab_fp, "settings": settings, "input_files": [p.name for p in files],
        "num_users": n_users, "num_items": len(c.item_order),
        "raw": c.raw_stats, "rating_dropped": int(c.rating_dropped), "duplicates_dropped": int(c.duplicates_dropped),
        "stats": _stats(c.lengths, len(c.item_order)),
        "splits": {"train": train_sample_count(c.lengths, train_targets_per_user), "valid": n_users, "test": n_users},
        "train_targets_per_user": train_targets_per_user,
        "schema": {f.name: str(f.type) for f in SEQUENCE_SCHEMA},
        "shards": c.shards, "vocabulary": "vocab/items.parquet", "users": "vocab/users.parquet",
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))


def load_prepared(path: str | Path) -> PreparedDataset:
    """The prepared dataset at ``path``: a local folder or a URI (``s3://``, ``gs://``)."""
    p = str(path) if locations.is_uri(path) else Path(path).expanduser().resolve()
    mf = locations.join(str(p), "manifest.json")
    if not locations.exists(mf):
        raise DataError(p, None, "not a prepared dataset (no manifest.json)", "run jobs/prepare.py first")
    manifest = json.loads(locations.read_bytes(mf))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(mf, "schema_version", f"version {manifest.get('schema_version')} != {SCHEMA_VERSION}",
                        "re-run jobs/prepare.py to rebuild the dataset")
    return PreparedDataset(p, manifest)


def format_summary(ds: PreparedDataset) -> str:
    m = ds.manifest
    s, r, sp = m["stats"], m["raw"], m["splits"]
    q = s["seq_len"]
    return "\n".join([
        f"dataset      {m['dataset']}  ({ds.path})",
        f"raw          {r['users']:,} users, {r['items']:,} items, {r['interactions']:,} interactions",
        f"filtered     {s['users']:,} users, {s['items']:,} items, {s['interactions']:,} interactions, "
        f"density {s['density']:.4%}",
        f"seq length   min {q['min']}, p5 {q['p5']:.0f}, p25 {q['p25']:.0f}, p50 {q['p50']:.0f}, "
        f"p75 {q['p75']:.0f}, p95 {q['p95']:.0f}, max {q['max']}, mean {q['mean']:.1f}",
        f"splits       train {sp['train']:,} samples, valid {sp['valid']:,}, test {sp['test']:,}",
        f"shards       {len(m['shards'])} x <= {m['settings']['rows_per_shard']} users",
    ])
