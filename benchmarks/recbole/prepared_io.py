"""Our prepared split (manifest + Parquet sequences) read, checked and written as RecBole atomic files."""
from __future__ import annotations

import json
from pathlib import Path


DATASET_NAME = "idle_prepared"  # no recbole/properties/dataset/<name>.yaml applies


# --------------------------------------------------------------------------- input
def read_prepared(prepared: Path):
    """Return (manifest, users int64[U], list of int64 item arrays) from our prepared dir."""
    import numpy as np
    import pyarrow.parquet as pq

    manifest = json.loads((prepared / "manifest.json").read_text())
    parts = sorted((prepared / "sequences").glob("part-*.parquet"))
    if not parts:
        raise SystemExit(f"no sequences/part-*.parquet under {prepared}")
    users, seqs = [], []
    for part in parts:
        table = pq.read_table(part, columns=["user", "items"])
        users.append(table.column("user").to_numpy().astype(np.int64))
        col = table.column("items").combine_chunks()
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy().astype(np.int64)
        seqs.extend(values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1))
    users = np.concatenate(users)
    return manifest, users, seqs


def validate(manifest, users, seqs, log):
    import numpy as np

    if len(np.unique(users)) != len(users):
        raise SystemExit("duplicate user ids in sequences")
    num_users = int(manifest.get("num_users", len(users)))
    num_items = int(manifest["num_items"])
    if len(users) != num_users:
        log.warning("manifest num_users=%d but %d sequences", num_users, len(users))
    lens = np.array([len(s) for s in seqs])
    if (lens < 3).any():
        log.warning("%d users have < 3 items (no training sample under leave-two-out)",
                    int((lens < 3).sum()))
    lo = min(int(s.min()) for s in seqs)
    hi = max(int(s.max()) for s in seqs)
    if lo < 1 or hi > num_items:
        raise SystemExit(f"item ids outside 1..{num_items}: min {lo}, max {hi}")
    present = np.zeros(num_items + 1, dtype=bool)
    for s in seqs:
        present[s] = True
    missing = int((~present[1:]).sum())
    return num_items, int(lens.sum()), missing


def write_atomic_files(workdir: Path, users, seqs, num_items: int, write_item_file: bool):
    """Write <data_path>/<name>/<name>.inter (timestamp = position in sequence)."""
    import numpy as np

    ddir = workdir / "data" / DATASET_NAME
    ddir.mkdir(parents=True)
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    u = np.repeat(users, lens)
    it = np.concatenate(seqs)
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    pos = np.arange(len(it), dtype=np.int64) - starts
    with open(ddir / f"{DATASET_NAME}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        np.savetxt(f, np.stack([u, it, pos], axis=1), fmt="%d", delimiter="\t")
    if write_item_file:
        with open(ddir / f"{DATASET_NAME}.item", "w") as f:
            f.write("item_id:token\n")
            np.savetxt(f, np.arange(1, num_items + 1), fmt="%d")
    return workdir / "data"
