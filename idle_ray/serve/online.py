"""Online recommendations on Ray Serve: ``POST /recommend``, ``GET /healthz``, ``GET /stats``.

    serve run idle_ray.serve.online:app config=configs/main_ml100k.yaml          (or: jobs/serve.py)
    curl -s -X POST localhost:8000/recommend -d '{"history": ["50", "172", "133"], "k": 5}'

Request: ``{"history": [original item ids, oldest first], "k": 10, "user_id": "optional, for the log",
"exclude_history": true}``. Response: ``{"items": [{"item_id", "title", "score"}...]}``, best first.
A request is turned into a sample by the same code as the batch job's (split ``next``), scored by
the same model class, and cut to top-K by the same rule, so the endpoint's answer for a history
equals the batch job's list for a user with that history.

Requests are scored in batches (``@serve.batch``); the model (frozen LLM, ID model, adapter
weights) loads once per replica. Bad requests (malformed JSON, an oversized body, an empty or
unknown history, k out of range) get a 4xx with one line and never reach the model.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter

import numpy as np
from ray import serve

from idle_ray.config import ExperimentConfig, experiment_from_dict, to_dict

logger = logging.getLogger("ray.serve")


class RequestError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, vocab_index: dict, max_k: int, max_history: int) -> tuple[np.ndarray, int, bool, str]:
    """(dense history, k, exclude_history, user id) from a request body, or :class:`RequestError`."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the body is not JSON; send {\"history\": [item ids], \"k\": 10}") from None
    if not isinstance(req, dict):
        raise RequestError(400, "the body must be a JSON object with 'history' and optionally 'k'")
    unknown_keys = sorted(set(req) - {"history", "k", "user_id", "exclude_history"})
    if unknown_keys:
        raise RequestError(400, f"unknown field(s) {unknown_keys}; known: history, k, user_id, exclude_history")
    history = req.get("history")
    if not isinstance(history, list) or not history:
        raise RequestError(400, "'history' must be a non-empty list of item ids, oldest first")
    if len(history) > max_history:
        raise RequestError(400, f"'history' has {len(history)} items; at most {max_history} (serve.max_history)")
    if not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in history):
        raise RequestError(400, "'history' items must be item ids (strings or integers)")
    k = req.get("k", 10)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= max_k:
        raise RequestError(400, f"'k' must be an integer from 1 to {max_k}")
    exclude = req.get("exclude_history", True)
    if not isinstance(exclude, bool):
        raise RequestError(400, "'exclude_history' must be true or false")
    unknown = [str(i) for i in history if str(i) not in vocab_index]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise RequestError(400, f"{len(unknown)} unknown item id(s): {shown}")
    dense = np.asarray([vocab_index[str(i)] for i in history], dtype=np.int32)
    return dense, k, exclude, str(req.get("user_id", ""))


class Recommendations:
    """Scores histories with a loaded model: the part of a replica that does not need Serve (tests,
    benchmarks and the batch job's equality check call it directly)."""

    def __init__(self, experiment: dict, prepared: str, kind: str, weights: str | None, id_artifact: str,
                 threads: int = 1):
        import torch

        from idle_ray.data.prepare import load_prepared
        from idle_ray.serve.topk import Vocabulary
        from idle_ray.train import builders
        from idle_ray.train.evaluate import scoring_model
        torch.set_num_threads(threads)
        self.cfg: ExperimentConfig = experiment_from_dict(experiment)
        self.prepared = load_prepared(prepared)
        self.model = scoring_model(self.cfg, self.prepared, kind, weights, id_artifact)
        self.vocab = Vocabulary(prepared)
        self.prompt_kwargs = builders.prompt_stage_kwargs(self.cfg, self.prepared) if kind == "adapter" else None

    def __call__(self, histories: list[np.ndarray], ks: list[int], excludes: list[bool]) -> list[list[dict]]:
        import pyarrow as pa
        import torch

        from idle_ray.data.samples import make_samples
        from idle_ray.serve.topk import top_k
        from idle_ray.train import builders
        from idle_ray.train.contexts import to_tensors
        column = pa.array([h.tolist() for h in histories], pa.list_(pa.int32()))
        batch = make_samples(np.zeros(len(histories), np.int32), column, "next", self.cfg.data.max_history)
        if self.prompt_kwargs is not None:
            batch = builders.encode_prompts(batch, **self.prompt_kwargs)
        with torch.no_grad():
            scores = self.model.full_sort_predict(to_tensors({k: v for k, v in batch.items() if k != "seen"}, "cpu"))
        out = []
        for row in range(len(histories)):  # per request: its own k and history rule
            items, values = top_k(scores[row:row + 1], ks[row], [batch["seen"][row]] if excludes[row] else None)
            out.append([{"item_id": self.vocab.item_ids[i], "title": self.vocab.titles[i], "score": float(s)}
                        for i, s in zip(items[0], values[0]) if np.isfinite(s)])
        return out


@serve.deployment
class Recommender:
    """One replica: the model loads once; requests are batched by ``@serve.batch``."""

    def __init__(self, experiment: dict, prepared: str, kind: str, weights: str | None, id_artifact: str):
        cfg = experiment_from_dict(experiment)
        self.s = cfg.serve
        self.scorer = Recommendations(experiment, prepared, kind, weights, id_artifact,
                                      threads=max(1, round(self.s.cpus_per_replica)))
        self.max_k = min(self.s.max_k, self.scorer.vocab.num_items)
        self.batch_sizes: Counter = Counter()
        self.requests = 0
        self.kind = kind
        self._score_batch.set_max_batch_size(self.s.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.s.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, requests: list[tuple[np.ndarray, int, bool]]) -> list[list[dict]]:
        self.batch_sizes[len(requests)] += 1
        return self.scorer([r[0] for r in requests], [r[1] for r in requests], [r[2] for r in requests])

    async def __call__(self, request):
        from starlette.responses import JSONResponse
        path = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if request.method == "GET" and path == "healthz":
            return JSONResponse({"status": "ok", "kind": self.kind, "items": self.scorer.vocab.num_items})
        if request.method == "GET" and path == "stats":
            return JSONResponse({"requests": self.requests,
                                 "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}})
        if path != "recommend":
            return JSONResponse({"error": "not found; use POST /recommend or GET /healthz"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": "use POST with a JSON body"}, status_code=405)
        try:
            declared = int(request.headers.get("content-length") or 0)
            if declared > self.s.max_body_bytes:
                raise RequestError(413, f"body of {declared} bytes; at most {self.s.max_body_bytes} (serve.max_body_bytes)")
            body = b""
            async for chunk in request.stream():  # a body without a length is cut off at the limit too
                body += chunk
                if len(body) > self.s.max_body_bytes:
                    raise RequestError(413, f"body over {self.s.max_body_bytes} bytes (serve.max_body_bytes)")
            history, k, exclude, user = parse_request(body, self.scorer.vocab.item_index, self.max_k,
                                                      self.s.max_history)
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except ValueError:
            return JSONResponse({"error": "bad Content-Length header"}, status_code=400)
        t0 = time.perf_counter()
        items = await self._score_batch((history, k, exclude))
        self.requests += 1
        if user:
            logger.info("recommend user=%s history=%d k=%d in %.1f ms", user, len(history), k,
                        1000 * (time.perf_counter() - t0))
        return JSONResponse({"items": items})


def build(cfg: ExperimentConfig, log=print):
    """The Serve application of ``cfg`` (weights checked, backbone cache built before any replica)."""
    from idle_ray.train import builders
    from idle_ray.train.runs import evaluation_inputs
    s = cfg.serve
    inputs = evaluation_inputs(cfg, s.kind, "test", s.weights, s.run)
    if s.kind == "adapter":
        builders.prepare_backbone(cfg, log=log)
    record = inputs["record"]
    autoscaling = {"min_replicas": s.min_replicas, "max_replicas": max(s.max_replicas, s.min_replicas),
                   "target_ongoing_requests": s.target_ongoing_requests}
    return Recommender.options(autoscaling_config=autoscaling, ray_actor_options={"num_cpus": s.cpus_per_replica},
                               max_ongoing_requests=max(2 * s.max_batch_size, int(2 * s.target_ongoing_requests))
                               ).bind(to_dict(cfg), str(inputs["prepared"].path), s.kind, record.get("weights") or None,
                                      inputs["artifact"])


def app(args: dict):
    """``serve run idle_ray.serve.online:app config=FILE [set=a.b=v,...]``: the application builder."""
    from idle_ray.config import load_config
    overrides = [x for x in str(args.get("set", "")).split(",") if x]
    return build(load_config(args.get("config"), overrides))
