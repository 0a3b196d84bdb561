"""Prepared data and ID-model artifacts in a bucket (``s3://``, on moto's local S3 server as in
``tests/test_storage.py``), without Ray: preparation and the export build locally and upload, the
completeness marker last; every reader opens them in the bucket; an interrupted upload or a truncated
file is rebuilt, never used. ``tests/test_multinode.py`` runs the same on a 3-node cluster."""
from __future__ import annotations

from test_storage import BUCKET, _files, s3  # noqa: F401 - s3: the module's S3 server fixture
from tiny_jobs import write_tiny_data


def test_prepared_data_and_artifact_round_trip_through_the_bucket(s3, tmp_path):  # noqa: F811
    import torch

    from idle_ray.build_once import is_complete, why_incomplete
    from idle_ray.data.pipeline import local_numpy_reader, sample_counts
    from idle_ray.data.prepare import load_prepared, prepare_dataset
    from idle_ray.models.artifact import load_id_artifact, save_id_artifact
    from idle_ray.models.registry import build_id_model

    inter, items = write_tiny_data(tmp_path)
    logs = []

    def prepare():
        return prepare_dataset("csv", f"s3://{BUCKET}/unit/data", path=str(inter), items_path=str(items),
                               min_item_interactions=1, rows_per_shard=10, log=logs.append)

    ds = prepare()
    local = prepare_dataset("csv", tmp_path / "data", path=str(inter), items_path=str(items),
                            min_item_interactions=1, rows_per_shard=10, log=logs.append)
    assert isinstance(ds.path, str) and ds.path.startswith(f"s3://{BUCKET}/unit/data/csv-")
    assert ds.manifest == local.manifest and ds.item_titles() == local.item_titles()
    assert sample_counts(ds, "train", 6, 2, world=2) == sample_counts(local, "train", 6, 2, world=2)
    assert [b["target"].tolist() for b in local_numpy_reader(ds, "test", 6)] == \
        [b["target"].tolist() for b in local_numpy_reader(local, "test", 6)]
    key = ds.path[len("s3://"):]
    assert sorted(_files(s3, key)) == sorted([".complete.json", "manifest.json", "vocab/items.parquet",
                                              "vocab/users.parquet"] + ds.manifest["shards"])
    assert load_prepared(ds.path).manifest == ds.manifest
    assert prepare().path == ds.path and logs[-1] == f"[prepare] cache hit: {ds.path}"
    s3.delete_file(f"{key}/.complete.json")  # an interrupted upload
    assert prepare().manifest == ds.manifest and is_complete(ds.path)
    assert any("is incomplete (no .complete.json" in line for line in logs), logs

    torch.manual_seed(0)
    model = build_id_model("sasrec", ds.num_items, hidden_size=8, num_layers=1, num_heads=1, max_len=6)
    uri = f"s3://{BUCKET}/unit/artifacts/sasrec"
    assert save_id_artifact(model, uri, name="sasrec", kwargs={"hidden_size": 8, "num_layers": 1, "num_heads": 1,
                                                               "max_len": 6},
                            vocab_fingerprint=ds.manifest["vocab_fingerprint"]) == uri
    assert is_complete(uri)
    loaded, meta = load_id_artifact(uri, ds.manifest["vocab_fingerprint"])
    assert meta["name"] == "sasrec" and all(torch.equal(a, b) for a, b in zip(
        loaded.state_dict().values(), model.state_dict().values()))
    with s3.open_output_stream(f"{BUCKET}/unit/artifacts/sasrec/model.safetensors") as f:
        f.write(b"truncated")
    assert why_incomplete(uri).startswith("model.safetensors has 9 bytes")
