"""The driver of tests/test_multinode.py: the steps of ``jobs/train.py`` (prepare, pre-train the ID model,
train and test the adapter) on the cluster ``RAY_ADDRESS`` names, from a working folder that is emptied
after every step, as on a head node whose disk the workers never see.

    RAY_ADDRESS=127.0.0.1:PORT python tests/multinode_driver.py CONFIG   (run from an empty folder)

Prints one JSON line: the result record, what each step had left in the working folder (removed
before the next step), the node of every Ray Train worker the run started, and the cluster's nodes.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(config: str) -> None:
    import ray
    from ray.util.state import list_actors

    from idle_ray.config import load_config
    from idle_ray.train import builders, runs

    cfg = load_config(config)
    work = Path.cwd()
    left = {}

    def empty_working_folder(step: str) -> None:
        left[step] = sorted(p.name for p in work.iterdir())
        for p in work.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    prepared = builders.prepare_from_config(cfg)
    empty_working_folder("prepare")
    artifact, _ = runs.pretrain(cfg, prepared)
    empty_working_folder("pretrain")
    record = runs.train_and_test(cfg, prepared, artifact)
    empty_working_folder("train")

    names = {n["NodeID"]: n["NodeName"] for n in ray.nodes()}
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000, raise_on_missing_output=False)
    print(json.dumps({
        "record": {k: record[k] for k in ("run", "checkpoint", "epochs", "steps", "test")},
        "prepared": str(prepared.path), "artifact": artifact, "left": left,
        "train_worker_nodes": sorted(names[w.node_id] for w in workers),
        "nodes": sorted((n["NodeName"], n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
