"""The out-of-core engine (data.engine: local) writes the in-memory engine's folder byte for byte, on
logs that exercise every step across several chunks, spill files and sort ranges; and the synthetic
log generator (issue 14, items 1 and 3)."""
import filecmp
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from idle_ray.data import prepare_local, synthetic
from idle_ray.data.prepare import prepare_dataset
from idle_ray.data.readers import DataError

from test_data import assert_nothing_written

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"chunk_rows": 700, "partitions": 5}  # many chunks and spill files on a few thousand rows


def both_engines(tmp_path, dataset, path="", monkeypatch=None, **kw):
    """Prepare with each engine into its own folder; returns (local, memory, local's log lines)."""
    if monkeypatch is not None:
        monkeypatch.setattr(prepare_local, "ROWS_PER_RANGE", 400)  # several sort ranges
    lines = []
    local = prepare_dataset(dataset, tmp_path / "local", path=str(path), engine="local", log=lines.append,
                            **SMALL, **kw)
    memory = prepare_dataset(dataset, tmp_path / "memory", path=str(path), engine="memory", log=lambda *a: None, **kw)
    return local, memory, lines


def assert_same_folder(a, b):
    files = sorted(str(p.relative_to(a.path)) for p in a.path.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b.path)) for p in b.path.rglob("*") if p.is_file())
    assert a.path.name == b.path.name  # same fingerprint: the engine is not part of it
    differ = [f for f in files if not filecmp.cmp(a.path / f, b.path / f, shallow=False)]
    assert not differ, differ
    assert not (a.path / ".spill").exists()


def k_core_rounds(lines) -> int:
    return int(next(line for line in lines if "k-core:" in line).split("k-core: ")[1].split()[0])


def test_synthetic_parquet_log_with_titles(tmp_path, monkeypatch):
    log, titles = tmp_path / "log.parquet", tmp_path / "items.parquet"
    synthetic.write_synthetic_log(log, 6000, users=300, items=400, seed=3, titles_path=titles, log=lambda *a: None)
    local, memory, lines = both_engines(tmp_path, "parquet", log, monkeypatch, items_path=str(titles),
                                        rows_per_shard=7)
    assert_same_folder(local, memory)
    m = local.manifest
    assert m["duplicates_dropped"] > 0 and k_core_rounds(lines) >= 2  # the iteration is exercised
    assert m["stats"]["items"] < m["raw"]["items"] and m["stats"]["users"] < m["raw"]["users"]
    assert len(m["shards"]) > 10 and local.item_titles()[1].startswith("Synthetic item")


def test_csv_with_mapped_columns_ratings_and_file_order_ties(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    n = 5000
    df = pd.DataFrame({"who": rng.integers(0, 200, n).astype(str), "what": rng.zipf(1.6, n).clip(max=500),
                       "when": rng.integers(0, 50, n), "stars": rng.integers(1, 6, n)})  # many equal timestamps
    df = pd.concat([df, df.iloc[::37]])  # exact duplicates, far from their first copy
    df.to_csv(tmp_path / "r.csv", index=False, sep=";")
    columns = {"user": "who", "item": "what", "timestamp": "when", "rating": "stars"}
    local, memory, lines = both_engines(tmp_path, "csv", tmp_path / "r.csv", monkeypatch, columns=columns,
                                        delimiter=";", min_rating=2, rows_per_shard=9)
    assert_same_folder(local, memory)
    assert local.manifest["rating_dropped"] > 0 and local.manifest["duplicates_dropped"] > 0


def test_integer_ids_written_two_ways_keep_the_first_appearance_order(tmp_path, monkeypatch):
    """"7" and "07" are the same integer: the in-memory engine orders them by first appearance among
    the rows the k-core keeps. Here "07" occurs first in the file, but that row is filtered (its item
    is rare), so "7" comes first."""
    rows = [("07", "rare", 1)] + [(u, f"i{k % 6}", 10 + k) for u in ("7", "07", "3", "12") for k in range(8)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(tmp_path / "t.csv", index=False)
    local, memory, _ = both_engines(tmp_path, "csv", tmp_path / "t.csv", monkeypatch, min_item_interactions=2)
    assert_same_folder(local, memory)
    users = pq.read_table(local.path / "vocab" / "users.parquet")["original_id"].to_pylist()
    assert users == ["3", "7", "07", "12"]


def test_ml100k_identical(tmp_path, monkeypatch):
    local, memory, _ = both_engines(tmp_path, "ml-100k", monkeypatch=monkeypatch)
    assert_same_folder(local, memory)
    assert local.manifest["stats"]["interactions"] == 99_287


def test_ml1m_identical(tmp_path):
    """A million rows in the default chunks and spill files (6 s on an idle 2-core machine)."""
    local = prepare_dataset("ml-1m", tmp_path / "local", engine="local", log=lambda *a: None)
    memory = prepare_dataset("ml-1m", tmp_path / "memory", engine="memory", log=lambda *a: None)
    assert_same_folder(local, memory)
    assert local.manifest["stats"]["interactions"] == 999_611


def test_errors_in_a_later_chunk_name_the_file_row(tmp_path):
    df = pd.DataFrame({"user_id": [f"u{k % 50}" for k in range(3000)], "item_id": [f"i{k % 40}" for k in range(3000)],
                       "timestamp": np.arange(3000)})
    bad = df.astype({"timestamp": object})
    bad.loc[2345, "timestamp"] = -1
    bad.to_csv(tmp_path / "neg.csv", index=False)
    with pytest.raises(DataError, match="first at row 2345") as e:
        prepare_dataset("csv", tmp_path / "out", path=str(tmp_path / "neg.csv"), log=lambda *a: None, **SMALL)
    assert e.value.field == "timestamp"
    mixed = df.astype({"timestamp": object})
    mixed.loc[2100:, "timestamp"] = "2020-01-01T00:00:00"  # numbers, then ISO-8601 from the 4th chunk on
    mixed.to_csv(tmp_path / "mixed.csv", index=False)
    with pytest.raises(DataError, match="stored as number before row 2100, as ISO-8601 without a zone"):
        prepare_dataset("csv", tmp_path / "out", path=str(tmp_path / "mixed.csv"), log=lambda *a: None, **SMALL)
    mixed.loc[2000:, "timestamp"] = "2020-01-01T00:00:00"  # within one chunk, where "1400" would read as a year
    mixed.to_csv(tmp_path / "mixed.csv", index=False)
    for engine in ("local", "memory"):
        with pytest.raises(DataError, match="a mix of numbers .* and text \\('2020-01-01T00:00:00', row 2000\\)"):
            prepare_dataset("csv", tmp_path / "out", path=str(tmp_path / "mixed.csv"), engine=engine,
                            log=lambda *a: None, **SMALL)
    assert_nothing_written(tmp_path)


def test_synthetic_log_is_seeded_chunked_and_power_law(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "BLOCK_ROWS", 4000)
    quiet = {"log": lambda *a: None}
    a = synthetic.write_synthetic_log(tmp_path / "a.parquet", 20_000, seed=1, titles_path=tmp_path / "t.parquet",
                                      **quiet)
    synthetic.write_synthetic_log(tmp_path / "b.parquet", 20_000, seed=1, **quiet)
    synthetic.write_synthetic_log(tmp_path / "c.parquet", 20_000, seed=2, **quiet)
    assert filecmp.cmp(tmp_path / "a.parquet", tmp_path / "b.parquet", shallow=False)
    assert not filecmp.cmp(tmp_path / "a.parquet", tmp_path / "c.parquet", shallow=False)
    assert pq.ParquetFile(tmp_path / "a.parquet").metadata.num_row_groups == 5  # one block per row group
    log = pq.read_table(tmp_path / "a.parquet").to_pandas()
    assert len(log) == 20_000 and (a["users"], a["items"]) == (400, 40)
    per_user = log["user_id"].value_counts()
    assert per_user.max() > 10 * per_user.median()  # a heavy tail of activity
    per_item = log["item_id"].value_counts()
    assert per_item.iloc[0] > 5 * per_item.iloc[len(per_item) // 2]
    ties = log[log.duplicated(["user_id", "timestamp"], keep=False)]
    assert ties["item_id"].nunique() > 1 and log.duplicated().sum() > 0  # ties (other items) and exact duplicates
    titles = pq.read_table(tmp_path / "t.parquet").to_pandas()
    assert set(titles["item_id"]) == set(log["item_id"]) and a["items_occurring"] == len(titles)


def test_synthetic_log_job_then_prepare(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "jobs/synth_log.py"), "--interactions", "3000", "--out",
                        str(tmp_path / "s.parquet"), "--titles", str(tmp_path / "s-items.parquet"), "--int-ids"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert pq.read_schema(tmp_path / "s.parquet").field("user_id").type == "int64"
    ds = prepare_dataset("parquet", tmp_path / "out", path=str(tmp_path / "s.parquet"),
                         items_path=str(tmp_path / "s-items.parquet"), log=lambda *a: None)
    assert ds.manifest["raw"]["interactions"] == 3000 and ds.manifest["stats"]["users"] > 0
    r = subprocess.run([sys.executable, str(ROOT / "jobs/synth_log.py"), "--interactions", "0", "--out", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--interactions must be >= 1" in r.stderr


def test_parquet_chunks_are_read_one_row_group_at_a_time(tmp_path):
    """A slow consumer of a Parquet log's chunks (the local engine encodes and spills each) holds about one
    row group in Arrow memory, however many the file has: Arrow's dataset scanner read ahead of it (on a
    30M-row log the engine's peak RSS was 1.90 GiB with it, 1.23 GiB without), and ParquetFile's pre_buffer
    kept every row group's compressed bytes (here 16.5 MB at 48 groups against 4.1 MB)."""
    import time

    import pyarrow as pa

    from idle_ray.data.readers import interaction_frames

    rows, groups = 40_000, 24
    path = tmp_path / "log.parquet"
    with pq.ParquetWriter(path, pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                                           ("timestamp", pa.int64())])) as writer:
        for g in range(groups):
            ids = np.arange(g * rows, (g + 1) * rows)
            writer.write_table(pa.table({"user_id": [f"user-{i % 997:08d}" for i in ids],
                                         "item_id": [f"item-{i % 113:08d}" for i in ids], "timestamp": ids}))
    assert pq.ParquetFile(path).metadata.num_row_groups == groups
    one_group = pq.ParquetFile(path).read_row_group(0).nbytes
    frames = interaction_frames("parquet", str(path), chunk_rows=rows)
    seen, held = 0, []
    for df in frames:
        seen += len(df)
        time.sleep(0.2)  # the consumer's work; a read-ahead would fill Arrow's memory meanwhile
        held.append(pa.total_allocated_bytes())
    assert seen == rows * groups
    assert max(held) < 4 * one_group, (max(held), one_group)  # the chunk and its pandas frame
