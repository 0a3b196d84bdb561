"""Complete checkpoints (issue #15 item 9): a checkpoint folder that lacks one rank's optimizer shard or
manifest (an upload cut by a storage outage) is never resumed from (``resume_state``, ``try_restore``)
nor evaluated (``run_best_weights``, the job's ``best_weights``); each rank's upload
(``manifests.publish``) rides out an outage on a real S3-compatible server, and when storage stays
down it stops with the location, the file and the fix, without writing its manifest."""
from __future__ import annotations

import json
import os
import re
import warnings

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import save_file

from idle_ray.train import storage
from idle_ray.train.checkpoints import CKPT_META, CKPT_WEIGHTS, DS_TAG, TRAIN_SNAPSHOT
from idle_ray.train.manifests import IncompleteCheckpoint, manifest_name, missing, publish
from s3_server import S3Server

SHARD = f"{DS_TAG}/zero_pp_rank_{{}}_mp_rank_00_optim_states.pt"


def rank_files(folder, rank: int, epoch: int) -> str:
    """``folder`` with what rank ``rank`` writes into a checkpoint of ``epoch`` (see ``save_checkpoint``)."""
    os.makedirs(os.path.join(folder, DS_TAG), exist_ok=True)
    torch.save({"optimizer_state_dict": {"state": {}, "epoch": epoch}}, os.path.join(folder, SHARD.format(rank)))
    if rank == 0:
        weights = {"w": torch.full((2,), float(epoch))}
        save_file(weights, os.path.join(folder, CKPT_WEIGHTS))
        save_file(weights, os.path.join(folder, "best_" + CKPT_WEIGHTS))
        with open(os.path.join(folder, CKPT_META), "w") as f:
            json.dump({"epoch": epoch, "step": 10 * epoch, "history": []}, f)
    return str(folder)


def two_rank_run(root) -> str:
    """A run folder as a 2-rank run leaves it: checkpoints of epochs 1 and 2, each rank's part
    published by ``publish``, both registered in Ray Train's snapshot (epoch 2 the latest)."""
    run = root / "runs" / "run"
    names = ["checkpoint_2026-01-01_00-00-01.000000", "checkpoint_2026-01-01_00-00-02.000000"]
    for epoch, name in enumerate(names, start=1):
        for rank in (0, 1):
            publish(rank_files(root / f"local{epoch}{rank}", rank, epoch), pafs.LocalFileSystem(), str(run / name),
                    rank, 2)
    results = [{"checkpoint_dir_name": n, "metrics": {}} for n in names]
    (run / TRAIN_SNAPSHOT).write_text(json.dumps({"checkpoint_results": results, "latest_checkpoint_result": results[-1]}))
    return str(run)


class FakeEngine:
    def __init__(self):
        self.loaded = None

    def load_checkpoint(self, d, **kw):
        self.loaded = json.loads(open(os.path.join(d, CKPT_META)).read())["epoch"]


class Ctx:
    def __init__(self, latest):
        self.rank, self.world, self.latest = 0, 1, latest

    def get_checkpoint(self):
        return self.latest


@pytest.mark.parametrize("lost", [None, SHARD.format(1), manifest_name(1), manifest_name(0)])
def test_a_checkpoint_without_one_ranks_files_is_neither_resumed_nor_evaluated(tmp_path, lost):
    from ray.train import Checkpoint

    from idle_ray.train.checkpoints import resume_state, try_restore
    from idle_ray.train.launch import best_weights
    from idle_ray.train.weights import run_best_weights

    run = two_rank_run(tmp_path)
    old, new = sorted(n for n in os.listdir(run) if os.path.isdir(os.path.join(run, n)))
    assert missing(pafs.LocalFileSystem(), os.path.join(run, new)) == []
    if lost:
        os.remove(os.path.join(run, new, lost))
        assert missing(pafs.LocalFileSystem(), os.path.join(run, new)) == [lost]
    want = old if lost else new
    epoch = 1 if lost else 2

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        location, state = resume_state(run)
        engine = FakeEngine()
        restored = try_restore(engine, Ctx(Checkpoint(os.path.join(run, new))), run, str(tmp_path / "best"))
    assert location == os.path.join(run, want) and state["epoch"] == epoch
    assert engine.loaded == epoch and restored["resumes"] == [{"epoch": epoch, "step": 10 * epoch,
                                                                "fallback": bool(lost)}]
    if lost:  # passed over with the folder and what it lacks
        assert any(f"{os.path.join(run, new)}: incomplete checkpoint, it lacks {lost}" in str(w.message)
                   for w in caught), [str(w.message) for w in caught]

    assert run_best_weights(str(tmp_path / "runs"), "run") == os.path.join(run, want, "best_" + CKPT_WEIGHTS)

    class Result:  # what trainer.fit() returns, as far as best_weights reads it
        checkpoint = Checkpoint(os.path.join(run, new))
    if lost:
        with pytest.raises(IncompleteCheckpoint, match=f"{os.path.join(run, new)}: incomplete checkpoint, it "
                           f"lacks {lost} .*Fix: rerun the same command"):
            best_weights(Result())
    else:
        assert best_weights(Result()) == os.path.join(run, new, "best_" + CKPT_WEIGHTS)


@pytest.fixture
def s3(monkeypatch):
    server = S3Server()
    server.start()
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        server.filesystem().create_dir("ckpts")
        yield server
    finally:
        server.stop()


def test_publish_rides_out_an_outage_then_names_what_it_could_not_upload(s3, tmp_path, monkeypatch):
    fs, dest = storage.resolve("s3://ckpts/run/checkpoint_a")
    local = rank_files(tmp_path / "rank1", 1, 1)
    # The server goes down for 3 s at the shard's first PUT: the upload is retried (by pyarrow's S3 client
    # or, once that gives up, by publish) and completes.
    s3.outage_at(lambda method, path: method == "PUT" and path.endswith("optim_states.pt"), 3.0)
    publish(local, fs, dest, 1, 2)
    assert len(s3.outages) == 1 and s3.outages[0][2].endswith(SHARD.format(1)), s3.outages
    manifest = json.loads(fs.open_input_stream(f"{dest}/{manifest_name(1)}").read())
    assert manifest["world"] == 2 and list(manifest["files"]) == [SHARD.format(1)]
    assert fs.get_file_info(f"{dest}/{SHARD.format(1)}").size == os.path.getsize(os.path.join(local, SHARD.format(1)))
    assert missing(fs, dest) == [manifest_name(0)]  # rank 0 has not published: still incomplete

    # Storage that stays down past the patience: the rank stops, naming the location, the file and the fix.
    monkeypatch.setattr(storage, "OUTAGE_PATIENCE_S", 2.0)
    s3.stop()
    with pytest.raises(storage.StorageUnavailable) as error:
        publish(rank_files(tmp_path / "rank0", 0, 1), fs, "ckpts/run/checkpoint_b", 0, 2)
    s3.start()
    assert re.match(r"uploading rank 0's best_trainable.safetensors to s3://ckpts/run/checkpoint_b: storage "
                    r"unreachable for 2 s \(.+\)\. Fix: check the endpoint", str(error.value)), str(error.value)
    no_manifest = fs.get_file_info(f"ckpts/run/checkpoint_b/{manifest_name(0)}")
    assert no_manifest.type == pafs.FileType.NotFound  # never written: the checkpoint never counts
    assert missing(fs, "ckpts/run/checkpoint_b") == [manifest_name(0)]


def test_a_rank_with_no_files_publishes_first_on_local_storage(tmp_path):
    """Under ZeRO-0 DeepSpeed writes nothing on rank 1, so its checkpoint part is an empty folder; its
    manifest may be the first thing written to the checkpoint folder (the resume tests' failure before
    the fix: FileNotFoundError from the local filesystem)."""
    empty = tmp_path / "rank1"
    empty.mkdir()
    dest = tmp_path / "runs" / "run" / "checkpoint_x"
    publish(str(empty), pafs.LocalFileSystem(), str(dest), 1, 2)
    assert json.loads((dest / manifest_name(1)).read_text()) == {"rank": 1, "world": 2, "files": {}}
    assert missing(pafs.LocalFileSystem(), str(dest)) == [manifest_name(0)]
    publish(rank_files(tmp_path / "rank0", 0, 1), pafs.LocalFileSystem(), str(dest), 0, 2)
    assert missing(pafs.LocalFileSystem(), str(dest)) == []
