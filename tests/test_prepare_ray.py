"""The Ray engine (data.engine: ray) writes the local engine's folder byte for byte: ML-1M, a synthetic
million-row Parquet log scanned in many pieces, crafted logs (integer ids written two ways across
pieces, a rating threshold, a k-core of several rounds), and bad input gives the local engine's error
(issue 14, item 2). A real local Ray with 2 CPUs, started once for the module."""
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from idle_ray.data import prepare_local, scan_pieces, synthetic
from idle_ray.data.prepare import prepare_dataset
from idle_ray.data.readers import DataError

from test_data import assert_nothing_written
from test_prepare_local import assert_same_folder, k_core_rounds

QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module", autouse=True)
def ray_2cpus():
    import ray
    # a loaded 2-core box can start the dashboard agent slower than the raylet's default 30 s wait,
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    started = not ray.is_initialized()
    for attempt in range(3 if started else 0):  # and Ray waits a fixed 30 s for its raylet: retry
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield
    if started:
        ray.shutdown()


def ray_and_local(tmp_path, dataset, path="", **kw):
    """Prepare with each engine into its own folder; returns (ray's, local's, ray's log lines)."""
    lines = []
    on_ray = prepare_dataset(dataset, tmp_path / "ray", path=str(path), engine="ray", log=lines.append, **kw)
    local = prepare_dataset(dataset, tmp_path / "local", path=str(path), engine="local", **QUIET, **kw)
    return on_ray, local, lines


def scan_tasks(lines) -> int:
    return int(next(line for line in lines if "scan task(s)" in line).split("ray: ")[1].split()[0])


def test_ml1m_identical(tmp_path):
    """One scan task (an atomic file is one piece), 4 partitions, several range tasks."""
    on_ray, local, lines = ray_and_local(tmp_path, "ml-1m")
    assert_same_folder(on_ray, local)
    assert on_ray.manifest["stats"]["interactions"] == 999_611 and len(on_ray.manifest["shards"]) > 2
    assert scan_tasks(lines) == 1 and int(next(x for x in lines if "range task(s)" in x).split(" in ")[1].split()[0]) > 1
    assert not (on_ray.path / ".spill").exists()


def test_synthetic_million_rows_in_many_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "BLOCK_ROWS", 300_000)       # 4 row groups
    monkeypatch.setattr(scan_pieces, "PIECE_ROWS", 120_000)    # 3 pieces per row group: ranges inside groups
    monkeypatch.setattr(prepare_local, "ROWS_PER_RANGE", 150_000)
    log, titles = tmp_path / "log.parquet", tmp_path / "items.parquet"
    synthetic.write_synthetic_log(log, 1_000_000, users=150_000, seed=5, titles_path=titles, **QUIET)
    assert pq.ParquetFile(log).metadata.num_row_groups == 4
    on_ray, local, lines = ray_and_local(tmp_path, "parquet", log, items_path=str(titles), partitions=7,
                                         rows_per_shard=300)
    assert_same_folder(on_ray, local)
    m = on_ray.manifest
    assert scan_tasks(lines) == 10 and m["duplicates_dropped"] > 0  # 3 + 3 + 3 + 1 (the last group: 100,000 rows)
    assert m["stats"]["users"] < m["raw"]["users"] and len(m["shards"]) > 10
    assert int(next(x for x in lines if "range task(s)" in x).split(" in ")[1].split()[0]) > 2


def write_parquet(df: pd.DataFrame, path, rows_per_group: int):
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=rows_per_group)


def test_integer_ids_written_two_ways_across_pieces(tmp_path, monkeypatch):
    """"7" / "07" and "5" / "005" are equal integers: the dense order follows the first appearance among
    the rows the k-core keeps, by file row. "005" occurs first in the file, but that row is filtered (a
    rare item), so "5" comes first. "07"'s first kept row is row 5, late in the first row group, and
    "7"'s is row 7, the second group's first: only the pieces' global row numbers order them."""
    monkeypatch.setattr(scan_pieces, "PIECE_ROWS", 4)
    rows = ([("005", "rare", 1)] + [("3", f"i{k}", 2 + k) for k in range(4)] +
            [("07", "i4", 7), ("12", "i0", 8), ("7", "i0", 10), ("5", "i1", 11)] +
            [(u, f"i{k % 6}", 20 + k) for u in ("7", "07", "5", "005", "12", "3") for k in range(5)])
    write_parquet(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]), tmp_path / "t.parquet", 7)
    on_ray, local, lines = ray_and_local(tmp_path, "parquet", tmp_path / "t.parquet", min_item_interactions=2,
                                         chunk_rows=4)
    assert_same_folder(on_ray, local)
    assert scan_tasks(lines) > 5
    users = pq.read_table(on_ray.path / "vocab" / "users.parquet")["original_id"].to_pylist()
    assert users == ["3", "5", "005", "07", "7", "12"]


def test_ratings_ties_and_a_k_core_of_several_rounds(tmp_path, monkeypatch):
    """Integer ids in a Parquet folder, many equal timestamps (file order decides), exact duplicates
    far apart, a rating threshold, and a 5-core that needs several rounds."""
    monkeypatch.setattr(scan_pieces, "PIECE_ROWS", 900)
    monkeypatch.setattr(prepare_local, "ROWS_PER_RANGE", 400)
    rng = np.random.default_rng(7)
    n = 6000
    df = pd.DataFrame({"who": rng.integers(0, 300, n), "what": rng.zipf(1.5, n).clip(max=800),
                       "when": rng.integers(0, 40, n), "stars": rng.integers(1, 6, n).astype(float)})
    # a cascade: user 1001 (4 rows) goes in round 1, then item 5001 (4 rows left), then users 1002-1005
    cascade = [(1001, w, 5, 5.0) for w in (5001, 1, 2, 3)] + [(u, w, 7, 5.0) for u in range(1002, 1006)
                                                             for w in (5001, 1, 2, 3, 4)]
    df = pd.concat([df, df.iloc[::29], pd.DataFrame(cascade, columns=df.columns)])
    (tmp_path / "logs").mkdir()
    write_parquet(df.iloc[:3500], tmp_path / "logs" / "a.parquet", 1000)
    write_parquet(df.iloc[3500:], tmp_path / "logs" / "b.parquet", 1000)
    columns = {"user": "who", "item": "what", "timestamp": "when", "rating": "stars"}
    on_ray, local, lines = ray_and_local(tmp_path, "parquet", tmp_path / "logs", columns=columns, min_rating=3,
                                         rows_per_shard=6, partitions=5)
    assert_same_folder(on_ray, local)
    m = on_ray.manifest
    assert m["rating_dropped"] > 0 and m["duplicates_dropped"] > 0 and k_core_rounds(lines) >= 3
    assert scan_tasks(lines) > 6


def test_csv_is_one_piece_and_identical(tmp_path):
    rng = np.random.default_rng(1)
    n = 4000
    df = pd.DataFrame({"user_id": rng.integers(0, 150, n).astype(str), "item_id": rng.zipf(1.7, n).clip(max=300),
                       "timestamp": rng.integers(0, 30, n)})
    df.to_csv(tmp_path / "r.csv", index=False)
    on_ray, local, lines = ray_and_local(tmp_path, "csv", tmp_path / "r.csv", chunk_rows=500, partitions=3,
                                         rows_per_shard=8)
    assert_same_folder(on_ray, local)
    assert scan_tasks(lines) == 1


def error_of(engine, tmp_path, path, **kw) -> DataError:
    with pytest.raises(DataError) as e:
        prepare_dataset("parquet", tmp_path / "out", path=str(path), engine=engine, **QUIET, **kw)
    return e.value


def test_bad_input_gives_the_local_engines_error(tmp_path, monkeypatch):
    """Errors in a later piece: the Ray engine re-reads as the local engine does, so the message (its
    row, its counts) is the same, and nothing is left behind."""
    monkeypatch.setattr(scan_pieces, "PIECE_ROWS", 300)
    df = pd.DataFrame({"user_id": [f"u{k % 50}" for k in range(3000)], "item_id": [f"i{k % 40}" for k in range(3000)],
                       "timestamp": np.arange(3000)})
    bad = df.copy()
    bad.loc[[2345, 2400, 2990], "timestamp"] = -1
    write_parquet(bad, tmp_path / "neg.parquet", 1000)
    on_ray, local = (error_of(e, tmp_path, tmp_path / "neg.parquet", chunk_rows=700) for e in ("ray", "local"))
    assert str(on_ray) == str(local) and "first at row 2345" in str(local)
    mixed = df.astype({"timestamp": str})
    mixed.loc[2100:, "timestamp"] = "2020-01-01T00:00:00"  # text from a later piece on: the kinds differ
    write_parquet(mixed, tmp_path / "mixed.parquet", 1000)
    on_ray, local = (error_of(e, tmp_path, tmp_path / "mixed.parquet", chunk_rows=700) for e in ("ray", "local"))
    assert str(on_ray) == str(local) and local.field == "timestamp"
    assert_nothing_written(tmp_path)
