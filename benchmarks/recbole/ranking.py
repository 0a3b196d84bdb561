"""Metrics from RecBole's score matrices under our rules (pessimistic ties, history masked) and JSON-able values."""
from __future__ import annotations

import math


def jsonable(value):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def rename_metrics(result) -> dict:
    out = {}
    for key, val in result.items():
        key = key.lower()
        if key.startswith("hit@"):
            key = "hr@" + key[4:]
        out[key] = float(val)
    return out


def pessimistic_metrics(ranks, topk) -> dict:
    """ranks: 0-based pessimistic ranks (torch int64 tensor, one per user)."""
    import torch

    r = ranks.double()
    out = {}
    for k in topk:
        hit = (r < k).double()
        out[f"hr@{k}"] = float(hit.mean())
    for k in topk:
        out[f"ndcg@{k}"] = float(torch.where(r < k, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r)).mean())
    for k in topk:
        out[f"mrr@{k}"] = float(torch.where(r < k, 1.0 / (r + 1.0), torch.zeros_like(r)).mean())
    out["mrr"] = float((1.0 / (r + 1.0)).mean())
    return out


def our_to_recbole_items(dataset, iid_field: str, num_items: int):
    """int64 array mapping our dense item id ``i`` (RecBole token ``str(i)``) to RecBole's own id."""
    import numpy as np

    remap = np.zeros(num_items + 1, dtype=np.int64)
    remap[1:] = dataset.token2id(iid_field, [str(i) for i in range(1, num_items + 1)])
    return remap


def earlier_items_lookup(dataset, config, users, seqs, num_items: int):
    """``f(recbole_user_ids, recbole_targets) -> [earlier items of each user, RecBole ids]``.

    "Earlier items" is our protocol's mask: every item of the user's full sequence before the
    target (the valid target sits at position n-2, the test target at n-1).
    """
    import numpy as np

    remap = our_to_recbole_items(dataset, config["ITEM_ID_FIELD"], num_items)
    tokens = dataset.id2token(config["USER_ID_FIELD"], np.arange(1, dataset.user_num))
    by_user = {int(u): s for u, s in zip(users, seqs)}
    rb_seqs = [None] + [remap[by_user[int(t)]] for t in tokens]

    def earlier(user_ids, targets):
        out = []
        for u, t in zip(user_ids, targets):
            seq = rb_seqs[int(u)]
            if seq[-1] == t:
                out.append(seq[:-1])
            elif seq[-2] == t:
                out.append(seq[:-2])
            else:
                raise RuntimeError(f"target {t} of RecBole user {u} is neither its valid nor its test item")
        return out

    return earlier
