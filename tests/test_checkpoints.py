"""Resume: rank 0 chooses the checkpoint (the newest readable), every rank loads that one, and a rank
that cannot load it raises instead of resuming from another (two gloo processes, a fake engine)."""
import json
import os
import socket
import warnings

import pytest
import torch.multiprocessing as mp

from idle_ray.train.checkpoints import CKPT_META, DS_TAG, try_restore


class FakeEngine:
    def __init__(self):
        self.loaded = None

    def load_checkpoint(self, d, **kw):
        self.loaded = json.loads(open(os.path.join(d, CKPT_META)).read())["epoch"]


class Ctx:
    def __init__(self, rank, world, latest):
        self.rank, self.world, self.latest = rank, world, latest

    def get_checkpoint(self):
        return self.latest


def make_run(root, corrupt_latest: bool, registered=("checkpoint_000001", "checkpoint_000002")) -> str:
    """A run folder with checkpoints of epochs 1 and 2 (Ray names sort oldest first) and Ray Train's
    snapshot registering ``registered`` (none: no snapshot, as before the first registration)."""
    import pyarrow.fs as pafs

    from idle_ray.train.manifests import publish
    run = root / "run"
    for epoch in (1, 2):
        d = run / f"checkpoint_00000{epoch}"
        local = root / f"rank0_epoch{epoch}"  # what the one rank wrote, published as a run publishes it
        local.mkdir()
        (local / CKPT_META).write_text(json.dumps({"epoch": epoch, "step": 10 * epoch}))
        publish(str(local), pafs.LocalFileSystem(), str(d), 0, 1)
        (d / DS_TAG).mkdir()
    if corrupt_latest:
        (run / "checkpoint_000002" / CKPT_META).write_text("{ not json")
    if registered:
        register(str(run), registered)
    return str(run)


def register(run: str, names) -> None:
    """Ray Train's snapshot as it writes it: every kept checkpoint in registration order, the last latest."""
    from idle_ray.train.checkpoints import TRAIN_SNAPSHOT
    results = [{"checkpoint_dir_name": n, "metrics": {}} for n in names]
    with open(os.path.join(run, TRAIN_SNAPSHOT), "w") as f:
        json.dump({"checkpoint_results": results, "latest_checkpoint_result": results[-1]}, f)


def restore(rank, world, run, best_keep):
    from ray.train import Checkpoint
    engine = FakeEngine()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = try_restore(engine, Ctx(rank, world, Checkpoint(os.path.join(run, "checkpoint_000002"))), run,
                            best_keep)
    return engine.loaded, state["resumes"], [str(w.message) for w in caught]


def test_one_rank_falls_back_to_the_older_checkpoint(tmp_path):
    run = make_run(tmp_path, corrupt_latest=True)
    loaded, resumes, warned = restore(0, 1, run, str(tmp_path / "best"))
    assert loaded == 1 and resumes == [{"epoch": 1, "step": 10, "fallback": True}]
    assert any("could not be loaded (JSONDecodeError" in w for w in warned)
    assert any(w.startswith(f"latest checkpoint {run}/checkpoint_000002 is unreadable; resumed from the older")
               for w in warned)


def _rank(rank, world, port, run, out, rank1_breaks):
    import ray.train  # noqa: F401 - imported before json.load is broken below
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if rank == 1 and rank1_breaks:  # rank 1's first read fails (transient), where rank 0's does not
            real_load = json.load

            def load_once_broken(f):
                json.load = real_load
                raise OSError("transient read error")
            json.load = load_once_broken
        result = restore(rank, world, run, os.path.join(out, f"best{rank}"))[:2]
    except Exception as e:  # noqa: BLE001 - reported to the test
        result = repr(e)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("rank1_breaks", [False, True])
def test_ranks_resume_from_the_checkpoint_rank0_chose(tmp_path, rank1_breaks):
    run = make_run(tmp_path, corrupt_latest=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(2, port, run, str(tmp_path), rank1_breaks), nprocs=2, start_method="spawn")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0] == [2, [{"epoch": 2, "step": 20, "fallback": False}]]
    if rank1_breaks:  # no silent fallback to epoch 1 on rank 1
        assert "transient read error" in got[1]
    else:
        assert got[1] == got[0]


def test_tune_replays_the_epochs_of_the_checkpoint_train_resumes_from(tmp_path):
    """A driver killed between a checkpoint's upload and its registration leaves a newer folder than
    the one Ray Train resumes from: the epochs a restarted Tune trial replays must be the resumed
    checkpoint's, or the epoch trained again is reported twice (CI saw epochs [1, 2, 2, 3])."""
    from idle_ray.train.checkpoints import resume_state
    from idle_ray.tune.search import trained_epochs
    run = make_run(tmp_path, corrupt_latest=False, registered=())
    for epoch in (1, 2):
        meta = os.path.join(run, f"checkpoint_00000{epoch}", CKPT_META)
        history = [{"epoch": e, "ndcg@10": 0.1 * e} for e in range(1, epoch + 1)]
        with open(meta, "w") as f:
            json.dump({"epoch": epoch, "step": 10 * epoch, "history": history}, f)
    # No snapshot yet: Train starts the run from scratch, so nothing is replayed.
    assert trained_epochs(run) == [] and resume_state(run) is None
    register(run, ["checkpoint_000001"])  # Train registered epoch 1 only; checkpoint_000002 is unregistered
    replay = trained_epochs(run)
    assert [m["epoch"] for m in replay] == [1]
    assert replay[-1]["checkpoint_path"] == os.path.join(run, "checkpoint_000001")
    assert resume_state(run)[1]["epoch"] == 1
    register(run, ["checkpoint_000001", "checkpoint_000002"])
    assert [m["epoch"] for m in trained_epochs(run)] == [1, 2]
    # The registered one unreadable: the worker falls back to the newest readable other one, and so does the replay.
    with open(os.path.join(run, "checkpoint_000002", CKPT_META), "w") as f:
        f.write("{ not json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [m["epoch"] for m in trained_epochs(run)] == [1]


def test_a_folder_ray_did_not_register_is_never_resumed_from(tmp_path):
    """Uploads cut by a storage outage leave folders Ray Train never registered, newer or older than the
    latest registered one, with the state file and part of DeepSpeed's folder: when the latest is
    unreadable the run falls back to a registered checkpoint only."""
    run = make_run(tmp_path, corrupt_latest=True)
    for name, epoch in (("checkpoint_0000015", 2), ("checkpoint_000003", 3)):  # half-written, unregistered
        d = tmp_path / "run" / name
        (d / DS_TAG).mkdir(parents=True)
        (d / CKPT_META).write_text(json.dumps({"epoch": epoch, "step": 10 * epoch}))
    loaded, resumes, _ = restore(0, 1, run, str(tmp_path / "best"))
    assert loaded == 1 and resumes == [{"epoch": 1, "step": 10, "fallback": True}]


def test_an_unreachable_storage_is_waited_for_then_named_never_a_fallback(monkeypatch):
    """A checkpoint on storage that does not answer (an S3 endpoint nobody listens on) is neither
    corrupt nor missing: choosing waits out the patience and stops with the location and the fix,
    instead of passing over it to an older checkpoint."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from idle_ray.train import storage
    from idle_ray.train.checkpoints import choose_checkpoint

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fs = pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}", scheme="http", access_key="k",
                           secret_key="k", region="us-east-1")
    monkeypatch.setattr(storage, "OUTAGE_PATIENCE_S", 3.0, raising=False)
    candidates = [Checkpoint(f"bucket/run/checkpoint_00000{e}", filesystem=fs) for e in (2, 1)]
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            choose_checkpoint(candidates)
        except Exception as e:  # noqa: BLE001 - checked below
            error = e
    assert not [w for w in caught if "trying an older one" in str(w.message)]  # no fallback was tried
    assert type(error).__name__ == "StorageUnavailable", repr(error)
    msg = str(error)
    assert msg.startswith("reading bucket/run/checkpoint_000002/train_state.json: storage unreachable for 3 s (")
    assert "Fix:" in msg and "resumes from the last checkpoint" in msg
    assert any("retrying for up to 3 s" in str(w.message) for w in caught)


class _Planted:
    """Unpickling this writes a marker file (what an attacker with write access to storage would plant)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path):
    """DeepSpeed loads its ``.pt`` files with ``weights_only=False``: a planted ``__reduce__`` in the
    optimizer state must be refused before that, and never run (the marker file is never written)."""
    import torch

    from ray.train import Checkpoint

    from idle_ray.train.checkpoints import UnsafeCheckpointError
    run = make_run(tmp_path, corrupt_latest=False)
    marker = tmp_path / "owned"
    ds = os.path.join(run, "checkpoint_000002", DS_TAG)
    torch.save({"optimizer_state_dict": {"state": {}}, "extra": _Planted(str(marker))},
               os.path.join(ds, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    torch.save({"module": {"w": torch.zeros(2)}}, os.path.join(ds, "mp_rank_00_model_states.pt"))
    engine = FakeEngine()
    with pytest.raises(UnsafeCheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt in the checkpoint "
                       "would run code when unpickled"):
        try_restore(engine, Ctx(0, 1, Checkpoint(os.path.join(run, "checkpoint_000002"))), run, str(tmp_path / "b"))
    assert not marker.exists() and engine.loaded is None
    # The same files without the planted object resume normally (tensors and containers only).
    torch.save({"optimizer_state_dict": {"state": {}}}, os.path.join(ds, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    state = try_restore(engine, Ctx(0, 1, Checkpoint(os.path.join(run, "checkpoint_000002"))), run, str(tmp_path / "b"))
    assert engine.loaded == 2 and state["epoch"] == 2 and not marker.exists()
