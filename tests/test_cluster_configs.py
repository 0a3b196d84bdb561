"""The cluster definitions in cluster/ pass Ray's own validation, offline, and stay locked down.

* Cluster-launcher YAMLs (cluster/*.yaml) go through the two steps `ray up` runs before it
  contacts a cloud: ``prepare_config`` (merge with the provider's defaults.yaml, docker checks,
  per-node-type worker bounds) and ``validate_config`` (Ray's ray-schema.json plus its
  cross-field checks).  The cloud-specific bootstrap that follows needs credentials and is not run.
* KubeRay manifests (cluster/kuberay/*.yaml): the RayCluster spec, and each RayJob's
  ``rayClusterSpec``, go through ``_derive_autoscaling_config_from_ray_cr`` -- the translation the
  KubeRay autoscaler runs inside the head pod -- and then the same two steps.
* RayJobs name an existing jobs/ script and configs/ file, and the config loads with the
  entrypoint's ``--set`` overrides.
* Security: no Ray port open to the internet, no LoadBalancer / NodePort Service, token auth on,
  no credentials in the files, no ``trust_remote_code=True`` anywhere in the code.
"""
from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_FILES = sorted(CLUSTER.glob("*.yaml"))
KUBERAY_FILES = sorted((CLUSTER / "kuberay").glob("*.yaml"))
ALL_FILES = LAUNCHER_FILES + KUBERAY_FILES

# Which script each RayJob must run.
RAYJOB_SCRIPTS = {"rayjob-train.yaml": "jobs/train.py", "rayjob-tune.yaml": "jobs/tune.py",
                  "rayjob-study.yaml": "jobs/study.py"}

PUBLIC_CIDRS = {"0.0.0.0/0", "::/0"}


def _ids(paths):
    return [str(p.relative_to(REPO)) for p in paths]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _validate_launcher(config: dict) -> dict:
    """What `ray up` does before touching the cloud: returns the prepared config or raises."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _ray_cr(doc: dict) -> dict:
    """The RayCluster custom resource a manifest creates (a RayJob embeds one as rayClusterSpec)."""
    if doc["kind"] == "RayCluster":
        cr = copy.deepcopy(doc)
    elif doc["kind"] in ("RayJob", "RayService"):
        cr = {"apiVersion": doc["apiVersion"], "kind": "RayCluster",
              "metadata": {"name": doc["metadata"]["name"]},
              "spec": copy.deepcopy(doc["spec"]["rayClusterSpec"])}
    else:
        raise AssertionError(f"unexpected kind {doc['kind']!r}")
    # The API server fills the namespace from `kubectl apply -n ...`; the translation needs one.
    cr["metadata"].setdefault("namespace", "default")
    return cr


def _validate_kuberay(doc: dict) -> dict:
    """The KubeRay autoscaler's translation of the cluster spec, then Ray's validation."""
    config = _derive_autoscaling_config_from_ray_cr(_ray_cr(doc))
    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def _requirements(name: str = "requirements.txt") -> list[str]:
    lines = (REPO / name).read_text().splitlines()
    return [ln.split(" #")[0].strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _walk(node):
    """Every dict nested anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _public_exposures(doc) -> list[str]:
    """Rules or services in a parsed YAML that expose anything but SSH to the internet."""
    found = []
    for d in _walk(doc):
        # AWS security-group rule (provider.security_group.IpPermissions).
        if "IpRanges" in d or "Ipv6Ranges" in d:
            cidrs = {r.get("CidrIp") for r in d.get("IpRanges", [])}
            cidrs |= {r.get("CidrIpv6") for r in d.get("Ipv6Ranges", [])}
            lo, hi = d.get("FromPort", -1), d.get("ToPort", -1)
            if cidrs & PUBLIC_CIDRS and (lo, hi) != (22, 22):
                found.append(f"security-group rule {d}")
        # GCP firewall rule.
        if "sourceRanges" in d and set(d["sourceRanges"]) & PUBLIC_CIDRS:
            ports = {str(p) for a in d.get("allowed", []) for p in a.get("ports", ["all"])}
            if ports != {"22"}:
                found.append(f"firewall rule {d}")
        # Kubernetes Services: KubeRay's head Service, or a Service object.
        svc_type = d.get("serviceType") or (d.get("spec", {}).get("type") if d.get("kind") == "Service" else None)
        if svc_type in ("LoadBalancer", "NodePort"):
            found.append(f"{svc_type} service")
        if d.get("enableIngress") is True:
            found.append("KubeRay ingress")
    return found


# ----------------------------------------------------------------------------- inventory

def test_every_expected_cluster_file_is_present():
    names = {str(p.relative_to(CLUSTER)) for p in ALL_FILES}
    assert {"aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml",
            "kuberay/rayjob-train.yaml", "kuberay/rayjob-tune.yaml", "kuberay/rayjob-study.yaml",
            "kuberay/rayservice.yaml"} <= names


@pytest.mark.parametrize("path", ALL_FILES, ids=_ids(ALL_FILES))
def test_file_opens_with_its_purpose_and_launch_command(path):
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("# "), "the file must open with a comment saying what it is for"
    rel = str(path.relative_to(REPO))
    if path.parent == CLUSTER:
        assert f"ray up {rel}" in header and "ray job submit" in header and f"ray down {rel}" in header
        assert f"ray dashboard {rel}" in header
    else:
        assert f"kubectl apply -f {rel}" in header and "kubectl port-forward" in header


def test_docs_cover_every_cluster_file():
    text = (REPO / "docs" / "cluster.md").read_text()
    for path in ALL_FILES:
        assert str(path.relative_to(REPO)) in text


# ----------------------------------------------------------------------------- cluster launcher

@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=_ids(LAUNCHER_FILES))
def test_launcher_yaml_passes_ray_schema_and_describes_an_autoscaling_gpu_cluster(path):
    raw = _load(path)
    cfg = _validate_launcher(raw)

    head_type = cfg["head_node_type"]
    head = cfg["available_node_types"][head_type]
    assert head["resources"].get("CPU") == 0, "the head runs drivers only: resources {CPU: 0}"
    assert "GPU" not in head["resources"]

    workers = {k: v for k, v in cfg["available_node_types"].items() if k != head_type}
    gpu_groups = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu_groups, "needs a GPU worker group"
    for name, group in gpu_groups.items():
        assert group["min_workers"] == 0, f"{name}: scale to zero when idle"
        assert group["max_workers"] >= 1, f"{name}: must be able to scale up"
    assert raw["idle_timeout_minutes"] > 0
    # The GPU group takes its ceiling from the global max_workers, so `ray up --max-workers N` works.
    assert all("max_workers" not in raw["available_node_types"][k] for k in gpu_groups)


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=_ids(LAUNCHER_FILES))
def test_launcher_pins_the_installed_ray_and_installs_the_project(path):
    cfg = _validate_launcher(_load(path))
    images = [cfg["docker"][k] for k in ("image", "head_image", "worker_image") if k in cfg["docker"]]
    assert images
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311"), image
    assert f"ray[default,train,tune,data,serve]=={ray.__version__}" in _requirements()
    mounts = cfg["file_mounts"]
    assert any(local == "requirements.txt" for local in mounts.values())
    assert any("pip install" in c and "requirements.txt" in c for c in cfg["setup_commands"])


def _pip_installs(commands: list[str]) -> set[tuple[str, bool]]:
    """``(requirements file name, --no-deps)`` of every ``pip install -r`` in shell commands."""
    out = set()
    for cmd in commands:
        for part in re.split(r"&&|\n", cmd):
            words = shlex.split(part.replace("\\", " "))
            if "pip" in words and "install" in words:
                for i, w in enumerate(words):
                    if w == "-r":
                        out.add((Path(words[i + 1]).name, "--no-deps" in words))
    return out


def _setup_sh_installs() -> set[tuple[str, bool]]:
    lines = [ln for ln in (REPO / "scripts/setup.sh").read_text().splitlines() if not ln.lstrip().startswith("#")]
    return {x for x in _pip_installs(lines) if x[0] != "requirements-dev.txt"}


def test_every_install_path_installs_what_setup_sh_installs():
    """scripts/setup.sh, the launcher YAMLs and cluster/Dockerfile (the KubeRay image) install the same
    files: requirements.txt, and the dataset / model packages with --no-deps; and those packages are
    the distributions the code reads its datasets and models from."""
    want = _setup_sh_installs()
    assert want == {("requirements.txt", False), ("requirements-assets.txt", True)}, want
    for path in LAUNCHER_FILES:
        cfg = _load(path)
        assert _pip_installs(cfg["setup_commands"]) == want, path.name
        mounted = {Path(local).name for local in cfg["file_mounts"].values()}
        assert {name for name, _ in want} <= mounted, path.name
    docker = (CLUSTER / "Dockerfile").read_text()
    runs = [ln[4:] for ln in docker.replace("\\\n", " ").splitlines() if ln.startswith("RUN ")]
    assert _pip_installs(runs) == {(f"requirements.txt", False), ("requirements-assets.txt", True)}
    assert re.search(rf"^ARG BASE=rayproject/ray:{re.escape(ray.__version__)}-py311-gpu$", docker, re.M)
    assets = {ln.split("==")[0] for ln in _requirements("requirements-assets.txt")}
    from idle_ray.data import inputs
    from idle_ray.llm import backbone_cache
    used = {inputs.ML100K_FILES[0], inputs.ML1M_FILES[0], backbone_cache.SMOLLM2_PACKAGE, backbone_cache.MINILM_PACKAGE}
    assert used == assets, (used, assets)


# What each launcher file must give its GPU workers so that they can write the bucket themselves,
# and what its header must say about the permissions.
WORKER_IDENTITY = {"aws.yaml": ("IamInstanceProfile", ["s3:ListBucket", "s3:GetObject", "s3:PutObject",
                                                        "s3:DeleteObject", "aws iam create-instance-profile"]),
                   "gcp.yaml": ("serviceAccounts", ["roles/storage.objectAdmin",
                                                    "gcloud iam service-accounts create"])}


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=_ids(LAUNCHER_FILES))
def test_launcher_workers_run_with_their_own_bucket_identity(path):
    """Train workers upload their checkpoint shards with their own node's identity, not the head's."""
    cfg = _validate_launcher(_load(path))
    key, documented = WORKER_IDENTITY[path.name]
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    for name, group in workers.items():
        identity = group["node_config"].get(key)
        assert identity, f"{name}: no {key}"
        names = [identity.get("Name") or identity.get("Arn")] if key == "IamInstanceProfile" else \
            [a.get("email") for a in identity]
        assert all(n and "idle-ray-worker" in n for n in names), identity
    header = path.read_text().split("\n\n")[0]
    for text in documented:
        assert text in header, f"{path.name}: the header should show {text!r}"


def _tune_cfg(overrides=()):
    if str(REPO) not in sys.path:  # plain `pytest` puts tests/, not the repo root, on the path
        sys.path.insert(0, str(REPO))
    from idle_ray.config import load_config
    return load_config(REPO / "configs/tune_ml1m.yaml", list(overrides))


def test_tune_concurrency_on_the_shipped_clusters():
    """The search on each shipped cluster runs as many trials as its maximum holds (2 GPUs per trial of
    tune_ml1m), not as its starting size (0 GPU workers) holds; KubeRay's job names it."""
    from idle_ray.tune.capacity import max_resources_from_autoscaler_config
    from idle_ray.tune.search import max_concurrent_trials

    cfg = _tune_cfg()
    for path in LAUNCHER_FILES:  # the config `ray up` leaves on the head for its autoscaler
        most = max_resources_from_autoscaler_config(_validate_launcher(_load(path)))
        assert most["GPU"] == 4 and most["CPU"] == 32, (path.name, most)
        assert max_concurrent_trials(cfg, most) == 2, path.name
    doc = _load(CLUSTER / "kuberay/rayjob-tune.yaml")
    most = max_resources_from_autoscaler_config(_validate_kuberay(doc))
    assert most["GPU"] == 8, most
    _, config, overrides = _entrypoint(doc)
    job_cfg = _tune_cfg(overrides)
    assert job_cfg.tune.max_concurrent_trials == max_concurrent_trials(_tune_cfg(["train.use_gpu=true"]), most) == 4


def test_study_rayjob_runs_one_cell_trial_per_gpu_worker():
    """The paper preset's RayJob names as many trials at once as its GPU ceiling holds (1 GPU per cell trial),
    on the GPU, with everything its workers read in the bucket."""
    from idle_ray.config import load_config
    from idle_ray.tune.capacity import max_resources_from_autoscaler_config
    from idle_ray.tune.search import max_concurrent_trials

    doc = _load(CLUSTER / "kuberay/rayjob-study.yaml")
    most = max_resources_from_autoscaler_config(_validate_kuberay(doc))
    _, config, overrides = _entrypoint(doc)
    cfg = load_config(REPO / config, overrides)
    assert cfg.train.use_gpu and cfg.train.num_workers == 1 and len(cfg.study.backbones) == 4
    assert cfg.tune.max_concurrent_trials == most["GPU"] == 8
    assert max_concurrent_trials(load_config(REPO / config, [o for o in overrides if "max_concurrent" not in o]),
                                 most) == 8


SECRET_NAME = re.compile(r"(?i)(secret|password|passwd|token|access_key|credential|private_key|session)")


def _env_var_names(text: str) -> list[str]:
    """Variable names set in every ``env_vars`` mapping of ``text``: JSON (``--runtime-env-json``) or
    YAML (``runtimeEnvYAML``, ``runtime_env``) blocks."""
    names = []
    for block in re.findall(r'"env_vars"\s*:\s*\{([^}]*)\}', text):
        names += re.findall(r'"([A-Za-z_][A-Za-z0-9_]*)"\s*:', block)
    for m in re.finditer(r"(?m)^(\s*)env_vars:\s*\n((?:\1\s+.*\n?)*)", text):
        names += re.findall(r"(?m)^\s+([A-Za-z_][A-Za-z0-9_]*)\s*:", m.group(2))
    for m in re.finditer(r"env_vars:\s*\{([^}]*)\}", text):
        names += re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*:", m.group(1))
    return names


def test_no_doc_or_cluster_file_puts_secrets_in_a_job_env():
    """A job's runtime environment is shown on the dashboard's job page: keys and tokens never go there."""
    assert _env_var_names('--runtime-env-json \'{"env_vars": {"AWS_SECRET_ACCESS_KEY": "x", "A": "1"}}\'') == \
        ["AWS_SECRET_ACCESS_KEY", "A"]
    assert _env_var_names("runtime_env:\n  env_vars:\n    RAY_AUTH_TOKEN: abc\n    B: 2\nnext: 1\n") == \
        ["RAY_AUTH_TOKEN", "B"]
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *ALL_FILES, CLUSTER / "Dockerfile",
             *sorted((REPO / "configs").glob("*.yaml"))]
    seen = 0
    for path in files:
        names = _env_var_names(path.read_text())
        seen += len(names)
        assert not [n for n in names if SECRET_NAME.search(n)], (path.name, names)
    assert seen  # the docs do show env_vars (the endpoint, offline flags): the scan reads them


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=_ids(LAUNCHER_FILES))
def test_launcher_keeps_token_auth_on_every_node(path):
    cfg = _validate_launcher(_load(path))
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in cfg[key] if "ray start" in c]
    assert len(starts) == 2
    for cmd in starts:
        assert "RAY_AUTH_MODE=token ray start" in cmd
    # The client's token (from `ray get-auth-token --generate`) reaches every node by file mount.
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=disabled" not in path.read_text()


def test_launcher_rejects_a_wrong_type():
    cfg = _load(CLUSTER / "aws.yaml")
    cfg["max_workers"] = "four"
    with pytest.raises(jsonschema.ValidationError, match="'four' is not of type 'integer'"):
        _validate_launcher(cfg)


def test_launcher_rejects_a_misspelled_top_level_key():
    cfg = _load(CLUSTER / "gcp.yaml")
    cfg["idle_timout_minutes"] = cfg.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timout_minutes"):
        _validate_launcher(cfg)


def test_launcher_rejects_a_misspelled_node_type_key():
    cfg = _load(CLUSTER / "aws.yaml")
    cfg["available_node_types"]["ray_gpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        _validate_launcher(cfg)


# ----------------------------------------------------------------------------- KubeRay

@pytest.mark.parametrize("path", KUBERAY_FILES, ids=_ids(KUBERAY_FILES))
def test_kuberay_cluster_spec_passes_ray_translation_and_schema(path):
    doc = _load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    cfg = _validate_kuberay(doc)

    spec = _ray_cr(doc)["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == ray.__version__
    assert spec.get("authOptions", {}).get("mode") == "token", "token auth must stay on"
    head = cfg["available_node_types"]["headgroup"]
    assert head["resources"]["CPU"] == 0, "the head runs drivers only: num-cpus 0"
    gpu_groups = {k: v for k, v in cfg["available_node_types"].items()
                  if k != "headgroup" and v["resources"].get("GPU", 0) >= 1}
    assert gpu_groups, "needs a GPU worker group"
    for name, group in gpu_groups.items():
        assert group["min_workers"] == 0 and group["max_workers"] >= 1, name
    assert cfg["idle_timeout_minutes"] > 0
    images = [d["image"] for d in _walk(spec) if "image" in d]
    assert images and all(re.fullmatch(rf"YOUR_REGISTRY/idle_ray:{re.escape(ray.__version__)}-py311-(cpu|gpu)", i)
                          for i in images), images  # the image of cluster/Dockerfile


def test_kuberay_rejects_a_negative_gpu_count():
    doc = _load(CLUSTER / "kuberay" / "raycluster.yaml")
    doc["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = "-1"
    with pytest.raises(jsonschema.ValidationError, match="-1 is less than the minimum of 0"):
        _validate_kuberay(doc)


def test_kuberay_rejects_a_quoted_replica_count():
    doc = _load(CLUSTER / "kuberay" / "rayjob-train.yaml")
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = "0"
    with pytest.raises(jsonschema.ValidationError, match="'0' is not of type 'integer'"):
        _validate_kuberay(doc)


RAYJOB_FILES = [p for p in KUBERAY_FILES if p.name in RAYJOB_SCRIPTS]


def _entrypoint(doc: dict) -> tuple[str, str, list[str]]:
    """(script, config, --set overrides) of a RayJob's `python jobs/X.py --config ...` entrypoint."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith("jobs/") and argv[1].endswith(".py"), argv
    config, overrides, rest = None, [], argv[2:]
    while rest:
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag == "--config":
            config = value
        elif flag == "--set":
            overrides.append(value)
        else:
            raise AssertionError(f"unexpected argument {flag!r} in {argv}")
    assert config and config.startswith("configs/") and config.endswith(".yaml"), argv
    return argv[1], config, overrides


@pytest.mark.parametrize("path", RAYJOB_FILES, ids=_ids(RAYJOB_FILES))
def test_rayjob_entrypoint_runs_an_existing_job_and_config(path):
    doc = _load(path)
    script, config, overrides = _entrypoint(doc)
    assert script == RAYJOB_SCRIPTS[path.name]
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    missing = [p for p in (script, config) if not (REPO / p).is_file()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not in the tree yet; this test checks them once they land")
    if str(REPO) not in sys.path:  # plain `pytest` puts tests/, not the repo root, on the path
        sys.path.insert(0, str(REPO))
    from idle_ray.config import load_config

    cfg = load_config(REPO / config, overrides)  # unknown keys or bad values raise ConfigError
    assert cfg.train.use_gpu is True
    _assert_workers_read_shared_storage(cfg)


def _assert_workers_read_shared_storage(cfg):
    """Workers run on GPU nodes, never on the head: all they read is in the bucket (house rule 15)."""
    from idle_ray.train.cluster import worker_read_locations
    local = [(f, v) for f, v in worker_read_locations(cfg) if not v.startswith(("s3://", "gs://"))]
    assert not local, f"node-local locations on a multi-node cluster: {local}"


@pytest.mark.parametrize("path", RAYJOB_FILES, ids=_ids(RAYJOB_FILES))
def test_rayjob_runtime_env_is_valid_and_mirrors_requirements(path):
    doc = _load(path)
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)  # Ray's own checks of working_dir URI and pip spec
    assert "pip" not in env, f"{path.name}: the packages come with the image (cluster/Dockerfile)"
    # KubeRay's submitter runs `ray job submit --runtime-env-json "<json>" -- <entrypoint>` through
    # bash, so `$` or backticks there would be expanded in the submitter pod.
    for text in (doc["spec"]["entrypoint"], doc["spec"]["runtimeEnvYAML"]):
        assert "$" not in text and "`" not in text


def test_rayservice_application_imports_loads_its_config_and_mirrors_requirements():
    """The RayService's Serve application: its import path is the builder, the builder's args load
    as a config (the --set list included), and its packages come with the image."""
    import importlib

    from idle_ray.config import load_config
    doc = _load(CLUSTER / "kuberay" / "rayservice.yaml")
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert serve_cfg["http_options"]["port"] == 8000
    (app,) = serve_cfg["applications"]
    module, name = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
    cfg = load_config(REPO / app["args"]["config"], app["args"]["set"].split(","))
    assert cfg.serve.run == "YOUR_RUN_NAME" and cfg.serve.max_replicas == 4
    _assert_workers_read_shared_storage(cfg)
    env = app["runtime_env"]
    assert set(env) <= RuntimeEnv.known_fields
    RuntimeEnv(**env)
    assert "pip" not in env


# ----------------------------------------------------------------------------- security

@pytest.mark.parametrize("path", ALL_FILES, ids=_ids(ALL_FILES))
def test_nothing_but_ssh_faces_the_internet(path):
    assert _public_exposures(_load(path)) == []
    for line in path.read_text().splitlines():
        code = line.split("#", 1)[0]
        assert "0.0.0.0/0" not in code and "::/0" not in code, line


def test_exposure_check_catches_public_rules_and_services():
    aws = _load(CLUSTER / "aws.yaml")
    aws["provider"]["security_group"]["IpPermissions"] = [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    assert _public_exposures(aws)
    _validate_launcher(aws)  # Ray's schema allows it, which is why this test exists
    ssh_only = {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    assert _public_exposures({"IpPermissions": [ssh_only]}) == []
    firewall = {"sourceRanges": ["0.0.0.0/0"], "allowed": [{"IPProtocol": "tcp", "ports": ["6379"]}]}
    assert _public_exposures(firewall)
    kube = _load(CLUSTER / "kuberay" / "raycluster.yaml")
    kube["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    assert _public_exposures(kube)
    assert _public_exposures({"kind": "Service", "spec": {"type": "NodePort"}})


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=_ids(LAUNCHER_FILES))
def test_launcher_adds_no_ingress_rules(path):
    # Ray's default security group already allows SSH plus intra-cluster traffic; any extra
    # IpPermissions would be appended to it.
    cfg = _load(path)
    assert not cfg["provider"].get("security_group", {}).get("IpPermissions")
    assert not any("firewall" in str(k).lower() for d in _walk(cfg) for k in d)


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=_ids(KUBERAY_FILES))
def test_kuberay_head_service_is_cluster_internal(path):
    spec = _ray_cr(_load(path))["spec"]
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


CREDENTIAL_PATTERNS = [
    r"AKIA[0-9A-Z]{16}",                       # AWS access key id
    r"(?i)aws_secret_access_key",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"(?i)\"type\":\s*\"service_account\"",    # GCP key file
    r"(?m)^\s*-?\s*name:\s*RAY_AUTH_TOKEN\s*\n\s*value:",  # literal token in a pod env
]


@pytest.mark.parametrize("path", ALL_FILES, ids=_ids(ALL_FILES))
def test_no_credentials_in_cluster_files(path):
    text = path.read_text()
    for pattern in CREDENTIAL_PATTERNS:
        assert not re.search(pattern, text), pattern


def _python_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
                             cwd=REPO, capture_output=True, text=True, check=True, timeout=30).stdout
        files = [REPO / line for line in out.splitlines() if line]
    except (OSError, subprocess.SubprocessError):  # not a git checkout (e.g. an sdist)
        files = [p for p in REPO.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    return [p for p in files if p.resolve() != Path(__file__).resolve() and p.is_file()]


def test_no_code_sets_trust_remote_code():
    pattern = re.compile(r"""trust_remote_code['"]?\s*[:=]\s*True\b""")
    files = _python_files()
    assert files, "no Python files found"
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in files
                 for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert offenders == [], "models must load without running downloaded code"
