"""jobs/recommend.py end to end on tiny inputs: a real jobs/train.py run (SASRec + IDLE on the tiny
decoder under Ray Train + DeepSpeed) makes the model, then the batch job writes top-K lists through a
Ray Data actor pool, and

* its lists equal a single-process scoring of the same users with the same weights (no Ray Data);
* history items are left out (and allowed with --include-history), ranks are 1..K, ids and titles original;
* a user file with an unknown id stops the job (exit 2, the id named, nothing written) unless
  --skip-unknown; K out of range stops it the same way; a rerun into the same output replaces it whole.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tiny_jobs import run_job


@pytest.fixture(scope="module")
def trained(tiny_train_job):
    """(work folder, config path, the train job's result record): the session's tiny train job."""
    return tiny_train_job


@pytest.fixture(scope="module")
def batch_top5(trained):
    """The batch job's top-5 lists of every user for the trained adapter run: ``(output folder, job)``."""
    work, config, record = trained
    out = work / "recs"
    return out, run_job("recommend.py", "--config", config, "--run", record["run"], "--top-k", 5, "--output", out,
                        cwd=work)


def single_process_top_k(config, weights, kind, k, users=None, exclude_history=True):
    """{original user id: [(original item id, title, score, in history)...]} scored in this process (no Ray)."""
    from idle_ray.config import load_config
    from idle_ray.serve.batch import local_top_k
    from idle_ray.serve.topk import Vocabulary
    from idle_ray.train import builders
    from idle_ray.train.evaluate import scoring_model

    cfg = load_config(str(config))
    prepared = builders.prepare_from_config(cfg, log=lambda *a: None)
    model = scoring_model(cfg, prepared, kind, weights, str(builders.id_artifact_dir(cfg, prepared)))
    vocab = Vocabulary(prepared.path)
    out = {}
    for batch_users, items, values, seen_lists in local_top_k(cfg, prepared, model, k, users, exclude_history):
        for u, row_items, row_scores, seen in zip(batch_users, items, values, seen_lists):
            out[vocab.user_ids[u]] = [(vocab.item_ids[i], vocab.titles[i], float(s), i in set(seen.tolist()))
                                      for i, s in zip(row_items, row_scores)]
    return out


def as_lists(table):
    rows = table.sort_by([("user_id", "ascending"), ("rank", "ascending")]).to_pylist()
    out = {}
    for r in rows:
        out.setdefault(r["user_id"], []).append(r)
    return out


def test_batch_recommendations_equal_single_process_scoring(trained, batch_top5):
    from idle_ray.serve.batch import read_recommendations
    work, config, record = trained
    out, r = batch_top5
    assert r.returncode == 0, r.stderr[-3000:]
    table, manifest = read_recommendations(str(out))
    assert manifest["users"] == 24 and manifest["rows"] == 24 * 5 and manifest["k"] == 5
    assert manifest["kind"] == "adapter" and manifest["run"] == record["run"] and manifest["exclude_history"]
    assert manifest["weights_metadata"]["idle_ray.task"] == "adapter"
    assert not list(work.glob("recs.tmp-*"))
    got = as_lists(table)
    weights = str(Path(record["checkpoint"]) / "best_trainable.safetensors")
    want = single_process_top_k(config, weights, "adapter", 5)
    assert sorted(got) == sorted(want)
    for user, rows in got.items():
        assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
        assert [(r["item_id"], r["title"]) for r in rows] == [(i, t) for i, t, _, _ in want[user]], user
        assert [r["score"] for r in rows] == pytest.approx([s for _, _, s, _ in want[user]], abs=1e-5)
        assert not any(seen for *_, seen in want[user])  # no item of the user's history
        assert all(r["title"].startswith("Movie ") and r["item_id"].startswith("i") for r in rows)


def test_user_file_unknown_ids_k_range_and_rerun(trained):
    from idle_ray.serve.batch import read_recommendations
    work, config, _ = trained
    out = work / "recs_id"
    users = work / "users.txt"
    users.write_text("user_id\nu3\nu5\nnobody\n")
    r = run_job("recommend.py", "--config", config, "--kind", "id_model", "--users", users, "--top-k", 3,
                "--output", out, cwd=work, timeout=300)
    assert r.returncode == 2 and "nobody" in r.stderr and "--skip-unknown" in r.stderr, r.stderr[-2000:]
    assert not out.exists()
    r = run_job("recommend.py", "--config", config, "--kind", "id_model", "--top-k", 31, "--output", out,
                cwd=work, timeout=300)
    assert r.returncode == 2 and "--top-k 31" in r.stderr and "30" in r.stderr, r.stderr[-2000:]
    assert not out.exists()

    r = run_job("recommend.py", "--config", config, "--kind", "id_model", "--users", users, "--skip-unknown",
                "--top-k", 3, "--include-history", "--output", out, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    table, manifest = read_recommendations(str(out))
    assert sorted(set(table["user_id"].to_pylist())) == ["u3", "u5"] and manifest["rows"] == 6
    assert not manifest["exclude_history"] and "skipping 1 unknown user id(s): nobody" in r.stdout
    from idle_ray.config import load_config
    from idle_ray.data.prepare import load_prepared  # noqa: F401 - the prepared data is where the config says
    from idle_ray.serve.topk import Vocabulary
    from idle_ray.train import builders
    prepared = builders.prepare_from_config(load_config(str(config)), log=lambda *a: None)
    dense = [Vocabulary(prepared.path).user_index[u] for u in ("u3", "u5")]
    want = single_process_top_k(config, None, "id_model", 3, users=dense, exclude_history=False)
    got = as_lists(table)
    for user in ("u3", "u5"):
        assert [r["item_id"] for r in got[user]] == [i for i, *_ in want[user]]

    # a rerun for every user replaces the two-user output whole
    r = run_job("recommend.py", "--config", config, "--kind", "id_model", "--top-k", 3, "--output", out, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    table, manifest = read_recommendations(str(out))
    assert manifest["users"] == 24 and len(set(table["user_id"].to_pylist())) == 24 and table.num_rows == 72
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    assert files == sorted(manifest["files"])


def post(url, body, raw=False):
    import urllib.error
    import urllib.request
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_endpoint_equals_batch_job_and_rejects_bad_requests(trained, batch_top5, ray_local):
    """Ray Serve on 127.0.0.1 with real HTTP: a user's full history gives the batch job's list for that
    user (top 5, the batch test's output); bad requests get a 4xx with one line and the replica keeps
    answering."""
    import socket
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from idle_ray.config import load_config
    from idle_ray.serve.batch import read_recommendations
    from idle_ray.serve.online import build
    from idle_ray.train import builders

    work, config, record = trained
    out, r = batch_top5
    assert r.returncode == 0, r.stderr[-3000:]
    batch = as_lists(read_recommendations(str(out))[0])
    assert {len(rows) for rows in batch.values()} == {5}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(str(config), [f"serve.run={record['run']}", "serve.cpus_per_replica=0.5",
                                    "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.05", "serve.max_k=10"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build(cfg, log=lambda *a: None), name="recs", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{url}/healthz", timeout=30) as h:
            assert json.loads(h.read())["status"] == "ok"
        prepared = builders.prepare_from_config(cfg, log=lambda *a: None)
        from idle_ray.serve.topk import Vocabulary
        vocab = Vocabulary(prepared.path)
        seqs = pq.read_table(prepared.sequences_dir).to_pydict()
        histories = {vocab.user_ids[u]: [vocab.item_ids[i] for i in items] for u, items in zip(seqs["user"], seqs["items"])}
        users = sorted(histories)[:12]
        with ThreadPoolExecutor(8) as pool:  # concurrent, so @serve.batch forms batches
            answers = list(pool.map(lambda u: post(f"{url}/recommend", {"history": histories[u], "k": 5, "user_id": u}),
                                    users))
        for u, (status, body) in zip(users, answers):
            assert status == 200, body
            assert [x["item_id"] for x in body["items"]] == [row["item_id"] for row in batch[u]], u
            assert [x["score"] for x in body["items"]] == pytest.approx([row["score"] for row in batch[u]], abs=1e-5)
            assert not set(x["item_id"] for x in body["items"]) & set(histories[u])

        bad = [(b"{not json", 400, "not JSON"), ({"history": []}, 400, "non-empty"),
               ({"history": ["i1", "no-such-item"]}, 400, "unknown item id(s): no-such-item"),
               ({"history": ["i1"], "k": 0}, 400, "from 1 to 10"), ({"history": ["i1"], "k": 11}, 400, "from 1 to 10"),
               ({"history": ["i1"], "colour": 1}, 400, "unknown field"),
               ({"history": ["i1"] * 70000}, 413, "serve.max_body_bytes")]
        for body, status, text in bad:
            got, answer = post(f"{url}/recommend", body, raw=isinstance(body, bytes))
            assert got == status and text in answer["error"], (body if isinstance(body, bytes) else str(body)[:80], answer)
        status, body = post(f"{url}/recommend", {"history": histories[users[0]], "k": 5})
        assert status == 200 and [x["item_id"] for x in body["items"]] == [row["item_id"] for row in batch[users[0]]]
        with urllib.request.urlopen(f"{url}/stats", timeout=30) as h:
            stats = json.loads(h.read())
        assert stats["requests"] == 13 and sum(int(k) * v for k, v in stats["batch_sizes"].items()) == 13
        assert max(int(k) for k in stats["batch_sizes"]) > 1  # 8 concurrent clients: some batching happened
    finally:
        serve.shutdown()
