"""The throughput benchmark job runs end to end on tiny inputs, with Ray absent: the standalone
worker path (one device, no Ray) must not need it, since GPU machines may not have it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

NO_RAY = """
import runpy, sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ray":
            raise ImportError("ray is not installed here")
sys.meta_path.insert(0, NoRay())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_benchmark_and_standalone_worker_run_without_ray(tiny_prepared, tmp_path):
    from idle_ray.models.sasrec import SASRec
    from idle_ray.models.artifact import save_id_artifact
    torch.manual_seed(0)
    kwargs = {"hidden_size": 16, "max_len": 6}
    artifact = save_id_artifact(SASRec(tiny_prepared.num_items, **kwargs), tmp_path / "sasrec", name="sasrec",
                                kwargs=kwargs, vocab_fingerprint=tiny_prepared.manifest["vocab_fingerprint"])
    sets = {"llm.backbone": "tiny-decoder", "id_model.artifact": artifact, "id_model.hidden_size": 16,
            "data.max_history": 6, "data.train_targets_per_user": 2, "prompt.max_history": 3,
            "prompt.max_tokens": 96, "adapter.prompt_length": 2, "adapter.projection_width": 16,
            "adapter.refine_bottleneck": 8, "train.batch_size": 4, "train.eval_max_users": 5}
    out = tmp_path / "figures.json"
    cmd = [sys.executable, "-c", NO_RAY, str(ROOT / "benchmarks/train_throughput.py"), "--prepared",
           str(tiny_prepared.path), "--threads", "1", "--steps", "1", "--repeats", "2", "--warmup", "0",
           "--rows", "worker,feed,torch,ds0", "--standalone", "2", "--json", str(out),
           *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TMPDIR": str(tmp)})
    assert run.returncode == 0, run.stderr[-3000:]
    # the standalone run's temporary folders (best weights, checkpoints) are gone once it returns
    assert not [p.name for p in tmp.iterdir() if p.name.startswith(("idle_ray_worker_", "idle_ray_ckpt_"))]
    figures = json.loads(out.read_text())
    assert figures["errors"] == {}
    rows = {r["row"]: r for r in figures["rows"]}
    assert set(rows) == {"bare", "worker", "feed", "torch", "ds0", "standalone"}
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["bare"]["vs_bare"] == 1.0
    assert "vs bare" in run.stdout and "standalone" in run.stdout
