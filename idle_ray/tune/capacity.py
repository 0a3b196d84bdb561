"""How large the cluster may grow: what Tune's trial concurrency is sized on.

A cluster that starts with 0 workers has no CPUs or GPUs *now* (``ray.cluster_resources()``), but its
autoscaler adds nodes for pending work up to the node types' ``max_workers``. Sizing concurrency on
the current size would run one trial at a time forever; sizing it on the maximum lets Tune start that
many trials, whose pending Train workers make the autoscaler add the nodes.

The maximum comes from, in order:

1. the cluster config an autoscaler reported to the GCS (Ray's ``ClusterConfig``: node groups and
   their ``max_count``), which Ray Train and Ray Data read too;
2. the autoscaler config the head's autoscaler process runs with (``ray start
   --autoscaling-config=FILE``: ``ray up`` clusters, Ray's fake multi-node cluster), read on the head,
   where job drivers run;
3. the cluster's current resources: a cluster without an autoscaler stays the size it is.

An autoscaler this process cannot see (KubeRay's runs in its own container) falls back to 3: set
``tune.max_concurrent_trials`` there.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict

import yaml

AUTOSCALING_CONFIG_FLAG = "--autoscaling-config="
GCS_ADDRESS_FLAG = "--gcs-address="


def max_resources_from_autoscaler_config(config: dict) -> dict:
    """The resources of the head plus every node type at its ``max_workers``.

    A node type without ``max_workers`` is capped by the global ``max_workers`` (Ray's rule). With
    several worker types the global cap also bounds their sum, which this ignores: the result is an
    upper bound, and trials beyond what fits only wait for resources.
    """
    cap = config.get("max_workers")
    head_type = config.get("head_node_type")
    total: dict = defaultdict(float)
    for name, node_type in (config.get("available_node_types") or {}).items():
        count = node_type.get("max_workers", cap if cap is not None else 0)
        if cap is not None:
            count = min(count, cap)
        count += 1 if name == head_type else 0
        for key, amount in (node_type.get("resources") or {}).items():
            total[key] += count * float(amount)
    return dict(total)


def _reported_max() -> dict | None:
    """Ray's cluster config in the GCS, when an autoscaler reported one (node groups x max_count)."""
    from ray._private.state import state
    found = state.get_max_resources_from_cluster_config()
    # -1 max_count: unbounded (Ray returns sys.maxsize)
    return {k: (math.inf if v >= 2 ** 62 else float(v)) for k, v in found.items()} if found else None


def autoscaling_config_path(gcs_address: str, proc_root: str = "/proc") -> str | None:
    """The ``--autoscaling-config`` file of the autoscaler serving ``gcs_address`` on this machine,
    found by its command line (Linux ``/proc``); None when none runs here."""
    try:
        pids = [p for p in os.listdir(proc_root) if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(os.path.join(proc_root, pid, "cmdline"), "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue  # gone meanwhile, or another user's
        if GCS_ADDRESS_FLAG + gcs_address not in args:
            continue
        for arg in args:
            if arg.startswith(AUTOSCALING_CONFIG_FLAG):
                return os.path.expanduser(arg[len(AUTOSCALING_CONFIG_FLAG):])
    return None


def cluster_max_resources() -> tuple[dict, str]:
    """``(resources, where they come from)``: the most the connected cluster may hold (see the module
    docstring); never less than what it holds now."""
    import ray

    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    found, source = _reported_max(), "the cluster config reported to Ray's GCS"
    if found is None:
        path = autoscaling_config_path(ray.get_runtime_context().gcs_address)
        if path and os.path.isfile(path):
            with open(path) as f:
                found, source = max_resources_from_autoscaler_config(yaml.safe_load(f) or {}), f"autoscaler config {path}"
    if found is None:
        return now, "the cluster's current resources (no autoscaler config visible here)"
    return {k: max(now.get(k, 0.0), found.get(k, 0.0)) for k in set(now) | set(found)}, source
