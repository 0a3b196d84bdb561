"""The main job end to end on tiny inputs: prepare -> pre-train SASRec -> LLM-only and IDLE on a tiny
decoder under Ray Train + DeepSpeed (2 workers) -> distributed test evaluation -> table files."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from conftest import synthetic_interactions

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_end_to_end(tmp_path):
    synthetic_interactions(n_users=24).to_csv(tmp_path / "inter.csv", index=False)
    pd.DataFrame({"item_id": [f"i{i}" for i in range(30)], "title": [f"Movie {i}" for i in range(30)]}).to_csv(
        tmp_path / "items.csv", index=False)
    sets = {"data.dataset": "csv", "data.path": tmp_path / "inter.csv", "data.items_path": tmp_path / "items.csv",
            "data.output_dir": tmp_path / "data", "data.min_item_interactions": 1, "data.max_history": 6,
            "data.train_targets_per_user": 2, "id_model.hidden_size": 16, "id_model.dropout": 0.1,
            "id_model.artifact": tmp_path / "sasrec", "pretrain.epochs": 2, "pretrain.batch_size": 16,
            "pretrain.lr": 0.01, "pretrain.cpus_per_worker": 0.5, "llm.backbone": "tiny-decoder",
            "prompt.max_history": 3, "prompt.max_tokens": 96, "adapter.prompt_length": 2,
            "adapter.projection_width": 16, "adapter.refine_bottleneck": 8, "train.batch_size": 8,
            "train.storage_path": tmp_path / "runs", "train.log_every": 2}
    cmd = [sys.executable, str(ROOT / "jobs/main.py"), "--config", str(ROOT / "configs/main_ml100k.yaml"),
           "--out", str(tmp_path / "results"), "--variants", "id_only_all,id_only,llm_only,idle,idle_unanchored,idle_refit"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "results" / "results.json").read_text())
    assert [rec["row"] for rec in out["records"]] == ["id_only_all", "id_only", "llm_only", "idle", "idle_unanchored",
                                                      "idle_refit"]
    # IDLE (anchored on the all-target SASRec, as the config says), on its base alone, on the refit base,
    # each vs the best baseline
    assert [(c["row"], c["metric"]) for c in out["comparison"]] == [
        (row, m) for row in ("idle", "idle_unanchored", "idle_refit") for m in ("hr@5", "ndcg@5")]
    idle, unanchored, refit = out["records"][3], out["records"][4], out["records"][5]
    assert idle["anchor"] == {"artifact": str(tmp_path / "sasrec-all"), "weight": 0.5}
    assert "anchor" not in unanchored and "anchor" not in refit
    assert unanchored["run"] == idle["run"]  # one trained adapter, scored two ways
    assert idle["test"]["ranks"] != unanchored["test"]["ranks"]
    assert refit["run"] == idle["run"] and refit["train_seconds"] < idle["train_seconds"]  # the same trained adapter
    assert "[train] resumed at" not in r.stdout + r.stderr  # taken from the idle row, not relaunched to read it back
    assert refit["test_artifact"] != str(tmp_path / "sasrec") and refit["valid"]["users"] == 24
    assert refit["valid_base"]["full"]["ndcg@10"] != refit["valid"]["full"]["ndcg@10"]
    assert "[refit] validation NDCG@10 on every user" in r.stdout
    for c in out["comparison"]:
        assert c["lo"] <= c["diff"] <= c["hi"]
    for rec in out["records"]:
        assert rec["test"]["users"] == 24 and 0 <= rec["test"]["full"]["ndcg@10"] <= 1
    md = (tmp_path / "results" / "results.md").read_text()
    assert "| IDLE-Adapter (anchored, a=0.5) |" in md and "| IDLE-Adapter on its base (no anchor) |" in md
    assert (tmp_path / "results" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "IDLE-Adapter" in r.stdout
    # Tables recomputed from the saved records, without training (e.g. seeds run as separate jobs).
    merged = subprocess.run(cmd[:cmd.index("--variants")] + cmd[cmd.index("--variants") + 2:] + [
        "--from-results", str(tmp_path / "results" / "results.json"), "--out", str(tmp_path / "merged")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert merged.returncode == 0, merged.stderr[-3000:]
    table = md.split("\n\nconfig hash")[0]
    assert (tmp_path / "merged" / "results.md").read_text().split("\n\nconfig hash")[0] == table
    assert "[main] seed" not in merged.stdout  # nothing trained or tested again
    twice = subprocess.run(cmd + ["--from-results", ",".join([str(tmp_path / "results" / "results.json")] * 2),
                                  "--out", str(tmp_path / "merged2")], capture_output=True, text=True, cwd=tmp_path,
                           timeout=300)
    assert twice.returncode == 2 and "appears twice" in twice.stderr and not (tmp_path / "merged2").exists()
