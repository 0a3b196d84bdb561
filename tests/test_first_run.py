"""The newcomer's path: empty caches, real SmolLM2 weights, concurrent builders.

* ``build_once`` (house rule 14): one builder among concurrent processes, an incomplete entry
  reported and rebuilt, a later-damaged entry detected.
* The real SmolLM2 cache: two processes that look like Ray Train workers (a gloo process group of
  two) load the backbone at once over a planted incomplete cache (tokenizer files only, what an
  older version left behind): both load it, the folder ends complete, the repair is reported once.
* The main job on its own config (``configs/main_ml100k.yaml``: MovieLens-100K, real SmolLM2, two
  Ray Train workers) with ``HOME`` an empty folder, so that every cache starts empty, cut short
  with ``--set`` (one SASRec epoch, two adapter steps, a few evaluation users).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from idle_ray.build_once import COMPLETE_MARKER, build_once, is_complete, why_incomplete

ROOT = Path(__file__).resolve().parents[1]


def _slow_builder(final: str, log_file: str, barrier) -> None:
    def build(tmp: Path) -> None:
        with open(log_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # long enough for the other process to reach the lock
        (tmp / "a.txt").write_text("a" * 100)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"\0" * 10)

    barrier.wait()
    build_once(final, build, what="test", log=lambda m: None)


def test_build_once_one_builder_among_concurrent_processes(tmp_path):
    final, log_file = tmp_path / "entry", tmp_path / "builds.log"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_slow_builder, args=(str(final), str(log_file), barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(log_file.read_text().split()) == 1  # built once; the others waited and read it
    assert is_complete(final) and (final / "sub" / "b.bin").stat().st_size == 10
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # no temp folder left


def test_build_once_rebuilds_incomplete_and_damaged_entries(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()
    (final / "tokenizer.json").write_text("{}")  # what an interrupted build leaves: no marker
    messages, builds = [], []

    def build(tmp: Path) -> None:
        builds.append(1)
        (tmp / "weights.bin").write_bytes(b"x" * 32)

    assert "no .complete.json" in why_incomplete(final)
    build_once(final, build, what="test", log=messages.append)
    assert len(builds) == 1 and is_complete(final) and not (final / "tokenizer.json").exists()
    assert len(messages) == 1 and "incomplete" in messages[0] and str(final) in messages[0]
    build_once(final, build, what="test", log=messages.append)
    assert len(builds) == 1  # complete: read as it is
    (final / "weights.bin").write_bytes(b"x" * 5)  # damaged later (truncated)
    assert "5 bytes, 32 expected" in why_incomplete(final)
    build_once(final, build, what="test", log=messages.append)
    assert len(builds) == 2 and is_complete(final)


def test_build_once_failed_verification_leaves_nothing(tmp_path):
    final = tmp_path / "entry"

    def verify(tmp: Path) -> None:
        raise ValueError("weights missing")

    with pytest.raises(ValueError, match="weights missing"):
        build_once(final, lambda tmp: (tmp / "x").write_text("1"), verify, what="test", log=lambda m: None)
    assert not list(tmp_path.iterdir())  # no entry, no temp folder, no lock file


def _worker_loads_smollm2(rank: int, cache_dir: str, port: int, out: str) -> None:
    import io
    from contextlib import redirect_stdout

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)  # as inside a Ray Train worker
    if rank == 0:
        time.sleep(3)  # rank 1 builds: transformers' save_pretrained writes nothing there (the old bug)
    buf = io.StringIO()
    with redirect_stdout(buf):
        from idle_ray.llm.backbone import load_backbone
        b = load_backbone("smollm2-135m", cache_dir=cache_dir)
    Path(out).write_text(json.dumps({"layers": b.num_layers, "log": buf.getvalue()}))
    dist.barrier()
    dist.destroy_process_group()


def test_smollm2_cache_two_workers_repair_planted_incomplete_cache(tmp_path):
    import socket

    from idle_ray.llm.backbone_cache import smollm2_cache_dir, smollm2_gguf
    gguf, version = smollm2_gguf()
    cached = smollm2_cache_dir(str(tmp_path), gguf, version)
    cached.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (cached / name).write_text("{}")  # the broken state of the bug report: tokenizer files only
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [ctx.Process(target=_worker_loads_smollm2, args=(r, str(tmp_path), port, str(outs[r])))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads(o.read_text()) for o in outs]
    assert [r["layers"] for r in results] == [30, 30]
    logs = "".join(r["log"] for r in results)
    assert logs.count("is incomplete") == 1 and logs.count("de-quantising") == 1
    assert "waiting for its lock" in results[0]["log"]  # rank 0 waited for rank 1's build
    assert is_complete(cached)
    names = set(json.loads((cached / COMPLETE_MARKER).read_text())["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names


def test_main_job_first_run_with_empty_caches(tmp_path):
    """``jobs/main.py`` on ``configs/main_ml100k.yaml`` (real SmolLM2, 2 Ray Train workers) with an
    empty HOME: the backbone cache is built once on the driver, every stage finishes."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    sets = {"pretrain.epochs": 1, "train.max_steps": 2, "train.eval_max_users": 6, "eval.max_users": 6,
            "train.log_every": 1}
    cmd = [sys.executable, str(ROOT / "jobs/main.py"), "--config", str(ROOT / "configs/main_ml100k.yaml"),
           "--out", str(tmp_path / "results")]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1500)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    cache_root = home / ".cache" / "idle_ray" / "backbones"
    entries = [p for p in cache_root.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and is_complete(entries[0])
    assert (r.stdout + r.stderr).count("de-quantising") == 1  # built once, on the driver
    out = json.loads((tmp_path / "results" / "results.json").read_text())
    assert [rec["variant"] for rec in out["records"]][-1] == "idle"
    for rec in out["records"]:
        assert rec["test"]["users"] == 6
        if rec["variant"] != "id_only":
            assert rec["steps"] == 2
    shutil.rmtree(home, ignore_errors=True)
