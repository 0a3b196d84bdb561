"""Preprocessing and the bad-input matrix: each error names file + field + fix, leaves nothing."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from idle_ray.data.prepare import k_core, load_prepared, prepare_dataset
from idle_ray.data.readers import DataError
from idle_ray.data.samples import make_samples

from conftest import synthetic_interactions

ROOT = Path(__file__).resolve().parents[1]


def prep(tmp_path, path, items_path="", kind="csv", **kw):
    return prepare_dataset(kind, tmp_path / "out", path=str(path), items_path=str(items_path) if items_path else "",
                           log=lambda *a: None, **{"min_item_interactions": 1, **kw})


def assert_nothing_written(tmp_path):
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_prepare_layout_split_and_stats(tiny_prepared):
    m = tiny_prepared.manifest
    seqs = pq.read_table(tiny_prepared.sequences_dir).to_pydict()
    assert len(m["shards"]) == int(np.ceil(m["num_users"] / 7))
    lengths = np.array([len(s) for s in seqs["items"]])
    assert m["stats"]["interactions"] == lengths.sum()
    assert m["splits"] == {"train": int((lengths - 3).sum()), "valid": m["num_users"], "test": m["num_users"]}
    # chronological: timestamps non-decreasing within each user
    assert all(np.all(np.diff(t) >= 0) for t in seqs["timestamps"])
    vocab = pq.read_table(tiny_prepared.path / "vocab" / "items.parquet").to_pydict()
    assert vocab["item"] == list(range(1, m["num_items"] + 1))
    assert vocab["title"][vocab["original_id"].index("i3")] == "Movie 3"
    assert tiny_prepared.item_titles()[0] == ""


def test_tie_break_is_file_order(tmp_path):
    df = pd.DataFrame({"user_id": ["a"] * 5, "item_id": ["x", "y", "z", "w", "v"], "timestamp": [5, 5, 5, 1, 9]})
    df.to_csv(tmp_path / "t.csv", index=False)
    ds = prep(tmp_path, tmp_path / "t.csv", min_user_interactions=3)
    vocab = pq.read_table(ds.path / "vocab" / "items.parquet").to_pydict()
    order = [vocab["original_id"][i - 1] for i in pq.read_table(ds.sequences_dir)["items"][0].as_py()]
    assert order == ["w", "x", "y", "z", "v"]


def test_duplicates_dropped_and_kcore_iterates(tmp_path):
    df = synthetic_interactions()
    dup = pd.concat([df, df.iloc[:10]])
    dup.to_csv(tmp_path / "d.csv", index=False)
    ds = prep(tmp_path, tmp_path / "d.csv")
    assert ds.manifest["duplicates_dropped"] == 10
    assert ds.manifest["stats"]["interactions"] == len(df)
    # k-core: removing a rare item can push a user under the threshold, which must be iterated
    small = pd.DataFrame({"user_id": list("aaabbbb"), "item_id": list("xyzxyzq"), "timestamp": range(7)})
    kept = k_core(small, 3, 2)
    assert set(kept["user_id"]) == {"a", "b"} and "q" not in set(kept["item_id"])
    kept = k_core(small, 4, 2)
    assert len(kept) == 0


def test_cache_hit_and_fingerprint_change(tmp_path, tiny_csv):
    p, ip = tiny_csv
    a = prep(tmp_path, p, ip, min_user_interactions=5)
    mtime = (a.path / "manifest.json").stat().st_mtime_ns
    b = prep(tmp_path, p, ip, min_user_interactions=5)
    assert a.path == b.path and (b.path / "manifest.json").stat().st_mtime_ns == mtime
    c = prep(tmp_path, p, ip, min_user_interactions=6)
    assert c.path != a.path
    assert not [x for x in (tmp_path / "out").iterdir() if x.name.startswith(".tmp")]


def test_samples_windowing_by_hand():
    import pyarrow as pa
    items = pa.array([[1, 2, 3, 4, 5, 6], [7, 8, 9]], pa.list_(pa.int32()))
    tr = make_samples(np.array([1, 2]), items, "train", max_history=2)
    # user 1: targets at positions 1..3 -> items 2,3,4 ; user 2 (n=3): none
    assert tr["target"].tolist() == [2, 3, 4]
    assert tr["history"].tolist() == [[0, 1], [1, 2], [2, 3]]
    assert tr["history_len"].tolist() == [1, 2, 2]
    va = make_samples(np.array([1, 2]), items, "valid", max_history=3)
    assert va["target"].tolist() == [5, 8] and va["history"].tolist() == [[2, 3, 4], [0, 0, 7]]
    assert [s.tolist() for s in va["seen"]] == [[1, 2, 3, 4], [7]]
    te = make_samples(np.array([1, 2]), items, "test", max_history=3)
    assert te["target"].tolist() == [6, 9] and te["user"].tolist() == [1, 2]
    last1 = make_samples(np.array([1, 2]), items, "train", max_history=2, targets_per_user=1)
    assert last1["target"].tolist() == [4]


# ----------------------------------------------------------------------------- bad input matrix

def _csv(tmp_path, df, name="bad.csv"):
    p = tmp_path / name
    df.to_csv(p, index=False)
    return p


BAD = {
    "missing_column": (lambda df: df.drop(columns=["timestamp"]), "timestamp", "required column missing"),
    "wrong_type": (lambda df: df.assign(timestamp=["yesterday"] * len(df)), "timestamp", "neither a number nor"),
    "nan_timestamp": (lambda df: df.assign(timestamp=[np.nan] + list(df.timestamp[1:])), "timestamp", "NaN"),
    "negative_timestamp": (lambda df: df.assign(timestamp=[-5] + list(df.timestamp[1:])), "timestamp", "negative"),
    "empty_ids": (lambda df: df.assign(user_id=[""] + list(df.user_id[1:])), "user_id", "missing"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_interactions(tmp_path, case):
    mutate, field, text = BAD[case]
    p = _csv(tmp_path, mutate(synthetic_interactions()))
    with pytest.raises(DataError) as e:
        prep(tmp_path, p)
    assert e.value.field == field and text in str(e.value) and str(p) in str(e.value) and "Fix:" in str(e.value)
    assert_nothing_written(tmp_path)


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        prep(tmp_path, tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        prep(tmp_path, tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("user_id,item_id,timestamp\n")
    with pytest.raises(DataError, match="no rows"):
        prep(tmp_path, tmp_path / "header.csv")
    assert_nothing_written(tmp_path)


def test_corrupt_parquet(tmp_path):
    p = tmp_path / "x.parquet"
    p.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="not a readable Parquet"):
        prep(tmp_path, p, kind="parquet")
    assert_nothing_written(tmp_path)


def test_parquet_input_roundtrip(tmp_path):
    df = synthetic_interactions()
    df.to_parquet(tmp_path / "x.parquet")
    ds = prep(tmp_path, tmp_path / "x.parquet", kind="parquet")
    assert ds.manifest["stats"]["interactions"] == len(df)


def test_atomic_files_with_titles(tmp_path):
    df = synthetic_interactions()
    inter = tmp_path / "mine.inter"
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\n" +
                     "".join(f"{u}\t{i}\t{t}\n" for u, i, t in df.itertuples(index=False)))
    (tmp_path / "mine.item").write_text("item_id:token\tmovie_title:token_seq\n" +
                                        "".join(f"i{i}\tFilm {i}\n" for i in range(30)))
    ds = prep(tmp_path, inter, kind="atomic")
    assert "Film 3" in ds.item_titles()


def test_users_too_short_after_filtering(tmp_path):
    df = pd.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["x", "y", "x"], "timestamp": [1, 2, 3]})
    with pytest.raises(DataError, match="min_user_interactions"):
        prep(tmp_path, _csv(tmp_path, df), min_user_interactions=3)
    assert_nothing_written(tmp_path)


def test_title_table_problems(tmp_path, tiny_csv):
    p, _ = tiny_csv
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(30)] + ["ghost"], "title": ["t"] * 31})
    with pytest.raises(DataError, match="never occur") as e:
        prep(tmp_path, p, _csv(tmp_path, items, "items.csv"))
    assert e.value.field == "item_id"
    few = pd.DataFrame({"item_id": ["i1"], "title": ["t"]})
    with pytest.raises(DataError, match="no title"):
        prep(tmp_path, p, _csv(tmp_path, few, "few.csv"))
    clash = pd.DataFrame({"item_id": ["i1", "i1"], "title": ["a", "b"]})
    with pytest.raises(DataError, match="different titles"):
        prep(tmp_path, p, _csv(tmp_path, clash, "clash.csv"))
    assert_nothing_written(tmp_path)


def test_unknown_dataset_name():
    from idle_ray.data.readers import read_source
    with pytest.raises(DataError, match="unknown dataset"):
        read_source("ml-20m")


def test_load_prepared_rejects_other_folders(tmp_path):
    with pytest.raises(DataError, match="manifest"):
        load_prepared(tmp_path)


def test_prepare_job_bad_input_exits_nonzero(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "jobs/prepare.py"), "--set", "data.dataset=csv",
                        "--set", f"data.path={tmp_path / 'missing.csv'}", "--set", f"data.output_dir={tmp_path / 'o'}",
                        "--no-stream"], capture_output=True, text=True)
    assert r.returncode == 2 and "file not found" in r.stderr and "data.path" in r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    r = subprocess.run([sys.executable, str(ROOT / "jobs/prepare.py"), "--set", "data.nope=1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "data.nope" in r.stderr


def test_windows_cover_every_training_target_once():
    import pyarrow as pa

    from idle_ray.data.samples import make_samples, make_windows, window_count
    items = pa.array([list(range(1, 13)), [20, 21, 22, 23]], pa.list_(pa.int32()))
    w = make_windows(np.array([1, 2]), items, max_history=4)
    # user 1: training part 1..10, targets 2..10 (9) -> windows of 4: [7..10], [3..6], [2]
    assert w["target_seq"].tolist()[:3] == [[7, 8, 9, 10], [3, 4, 5, 6], [0, 0, 0, 2]]
    assert w["history"].tolist()[:3] == [[6, 7, 8, 9], [2, 3, 4, 5], [0, 0, 0, 1]]
    # user 2: training part 20, 21 -> one target (21) with input 20
    assert w["target_seq"].tolist()[3] == [0, 0, 0, 21] and w["history"].tolist()[3] == [0, 0, 0, 20]
    assert len(w["user"]) == window_count(np.array([12, 4]), 4) == 4
    prefix = make_samples(np.array([1, 2]), items, "train", max_history=4)
    assert sorted(t for row in w["target_seq"] for t in row if t) == sorted(prefix["target"].tolist())


def test_drawn_holdout_splits_training_targets_between_id_model_and_adapter(tiny_prepared):
    """``pretrain.holdout_window``: the ID model pre-trains on every training target but the drawn
    ones, the adapter on exactly the drawn ones; the draw is per user (not per batch or shard), among
    the last W targets, and the sample counts the loop plans with match what the pipeline yields."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from idle_ray.data.pipeline import sample_counts
    from idle_ray.data.samples import Holdout, build_samples, make_windows, target_positions
    lengths = [12, 30, 6, 4]
    users = np.array([3, 8, 5, 9])
    items = pa.array([list(range(100 * u, 100 * u + n)) for u, n in zip(users, lengths)], pa.list_(pa.int32()))
    pre, ada = Holdout(3, 10, seed=7), Holdout(3, 10, seed=7, adapter=True)
    every = make_samples(users, items, "train", max_history=5)
    id_part = make_samples(users, items, "train", max_history=5, holdout=pre)
    ad_part = make_samples(users, items, "train", max_history=5, holdout=ada)
    pairs = lambda s: {(int(u), int(t)) for u, t in zip(s["user"], s["target"])}  # noqa: E731
    assert pairs(id_part) | pairs(ad_part) == pairs(every) and not pairs(id_part) & pairs(ad_part)
    for u, n in zip(users, lengths):
        drawn = sorted(t - 100 * u for uu, t in pairs(ad_part) if uu == u)
        assert len(drawn) == min(3, n - 3) and all(max(1, n - 12) <= p <= n - 3 for p in drawn), (u, drawn)
    # Per user: the same draw when the user comes in another batch or next to other users.
    alone = make_samples(users[1:2], items[1:2], "train", max_history=5, holdout=ada)
    assert pairs(alone) == {p for p in pairs(ad_part) if p[0] == 8}
    # Another seed draws differently (30 targets, 3 drawn among the last 10).
    other = make_samples(users[1:2], items[1:2], "train", max_history=5, holdout=Holdout(3, 10, seed=8, adapter=True))
    assert pairs(other) != pairs(alone)
    # Windows: the drawn targets lose their loss, every other training target keeps it, inputs stay.
    w = make_windows(users, items, max_history=5, holdout=pre)
    kept = {(int(u), int(t)) for u, row in zip(w["user"], w["target_seq"]) for t in row if t}
    assert kept == pairs(id_part)
    assert {int(t) for row in w["history"] for t in row if t} >= {t for _, t in pairs(ad_part)} - {
        100 * u + n - 3 for u, n in zip(users, lengths)}  # a drawn item is still an input after it
    with pytest.raises(ValueError, match="targets <= window"):
        Holdout(3, 2)
    # The counts the training loop plans with (per rank share) equal what the pipeline yields.
    table = pq.read_table(tiny_prepared.sequences_dir, columns=["user", "items"])
    for h in (Holdout(2, 5, seed=1), Holdout(2, 5, seed=1, adapter=True)):
        counts = sample_counts(tiny_prepared, "train", 4, 0, holdout=h, world=2)
        got = [len(build_samples(table, "train", 4, 0, holdout=h, rank=r, world=2)["target"]) for r in (0, 1)]
        assert counts == got and sum(got) > 0
    rows, _ = target_positions(np.array([0, 12]), "train")
    assert len(rows) == 9
