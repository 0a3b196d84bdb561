"""Figure 4's data: item representations from the ID model, the frozen LLM and the adapter, their 2-D maps
(PCA and t-SNE, scikit-learn) and how close the adapter's ID tokens are to the LLM's text states (MMD)
before and after training.

For every item ``i`` (dense ids ``1..N``):

* **ID model**: its row ``E_i`` of the frozen item table ``(N, d)``.
* **LLM**: the frozen LLM's title embedding: the input states of layer 0 at the title's tokens (the
  title alone, no special tokens), averaged over the tokens ``(N, D)``. Layer 0's input is where the
  adapter's tokens enter the LLM, so the two clouds live in one space; the forward stops there.
* **Adapter**: ``E_i`` fed through the adapter as the method feeds a user state (an item embedding
  and a user state share the ID model's scoring space, ``u · E^T``): the alignment's ``k`` tokens
  ``h (k, D)``, refined for layer 0 (``p^(0) = h + G_0(LN(h))``; ``h`` when layer 0 is not refined),
  averaged over the ``k`` tokens for the map.

The MMD (the adapter's own estimator, :func:`idle_ray.adapter.mmd.mmd2`, unbiased, multi-bandwidth) is
between every adapter token (``N · k`` rows) and every title token state, at layer 0, for the adapter
as initialised (the cell's seed, as its training started) and with its selected trained weights.
"""
from __future__ import annotations

import numpy as np
import torch

MAP_METHODS = ("pca", "tsne")
CLOUDS = ("id_model", "llm", "adapter")
MMD_MAX_ROWS = 2048  # rows per side entering the MMD (a seeded random subset beyond)


class _StopForward(Exception):
    """Raised by a pre-hook of layer 0 once its input is captured: nothing above it is needed."""


@torch.no_grad()
def title_states(backbone, titles: list[str], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(per-item mean (N, D), every title token (M, D))``: layer 0's input states of each title."""
    tok = backbone.tokenizer
    ids = [tok(t or " ", add_special_tokens=False)["input_ids"] or [tok.unk_token_id] for t in titles]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    means, tokens = [], []
    for start in range(0, len(ids), batch_size):
        rows = ids[start:start + batch_size]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):  # right padding: no position shift for the real tokens
            input_ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        captured = {}

        def hook(module, args, kwargs):
            captured["x"] = (args[0] if args else kwargs["hidden_states"]).detach().float()  # (B, T, D)
            raise _StopForward

        handle = backbone.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            backbone.model(input_ids=input_ids, attention_mask=mask)
        except _StopForward:
            pass
        finally:
            handle.remove()
        x, m = captured["x"], mask.bool()
        means.append((x * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True))  # (B, D)
        tokens.append(x[m])  # (tokens, D)
    return torch.cat(means).numpy(), torch.cat(tokens).numpy()


@torch.no_grad()
def adapter_tokens(model, item_table: torch.Tensor) -> np.ndarray:
    """``(N, k, D)``: each item embedding ``(N, d)`` through ``model``'s alignment and layer 0's
    refinement (an :class:`idle_ray.adapter.model.IDLEModel` with ID tokens)."""
    adapter = model.adapter
    if adapter.alignment is None:
        raise ValueError(f"variant {model.variant!r} has no ID tokens to map")
    h = adapter.alignment(item_table.to(adapter.alignment.fc_in.weight.dtype))  # (N, k, D)
    refine = adapter.refinement
    if refine is not None and 0 in refine.layer_ids:
        h = refine.blocks["0"](h)  # p^(0)
    return h.float().numpy()


def mmd(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """Unbiased MMD² between the rows of ``a`` and ``b`` (at most :data:`MMD_MAX_ROWS` each, a seeded
    subset), without touching the global RNG."""
    from idle_ray.adapter.mmd import mmd2
    rng = np.random.default_rng(seed)
    a, b = (x[rng.choice(len(x), MMD_MAX_ROWS, replace=False)] if len(x) > MMD_MAX_ROWS else x for x in (a, b))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return float(mmd2(torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))))


def project(points: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """``(n, 2)``: PCA, or t-SNE (PCA initialised, perplexity ``min(30, (n - 1) / 3)``)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    x = np.asarray(points, dtype=np.float64)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    raise ValueError(f"unknown map method {method!r}; one of {MAP_METHODS}")


def _points(x: np.ndarray) -> list[list[float]]:
    return np.round(x, 4).tolist()


def representation_map(model, trained_state: dict, titles: list[str], genres: list[str], seed: int = 0) -> dict:
    """Figure 4's series from ``model`` (the IDLE cell's adapter as initialised) and its trained
    adapter state (loaded into ``model`` here), ``titles`` and ``genres`` per dense item id (index 0
    padding). Returns ``{"items", "genres", "prompt_length", "maps": {method: {cloud: (N, 2) points,
    "joint": {"llm", "adapter_before", "adapter_after": (N, 2)}}}, "mmd": {...}}``; a cloud's points
    are in item order, ``genres`` colours them."""
    model.eval()
    n = len(titles) - 1
    table = model.item_table_frozen[1:].float()  # (N, d): row 0 is padding
    llm_mean, llm_tokens = title_states(model.backbone, titles[1:])
    before = adapter_tokens(model, table)  # (N, k, D)
    model.load_adapter_state_dict(trained_state)
    after = adapter_tokens(model, table)
    k, width = after.shape[1], after.shape[2]
    clouds = {"id_model": table.numpy(), "llm": llm_mean, "adapter": after.mean(1)}
    maps = {}
    for method in MAP_METHODS:
        maps[method] = {name: _points(project(x, method, seed)) for name, x in clouds.items()}
        joint = project(np.concatenate([llm_mean, before.mean(1), after.mean(1)]), method, seed)
        maps[method]["joint"] = {"llm": _points(joint[:n]), "adapter_before": _points(joint[n:2 * n]),
                                 "adapter_after": _points(joint[2 * n:])}
    tokens_before, tokens_after = before.reshape(-1, width), after.reshape(-1, width)
    distance = {"layer": 0, "before": mmd(tokens_before, llm_tokens, seed), "after": mmd(tokens_after, llm_tokens, seed),
                "adapter_tokens": int(len(tokens_after)), "text_states": int(len(llm_tokens))}
    return {"items": n, "genres": list(genres[1:]), "prompt_length": k, "maps": maps, "mmd": distance}


def cell_representation_map(cfg, prepared, artifact: str, weights: str) -> dict:
    """:func:`representation_map` of a trained IDLE cell: ``cfg`` its config, ``artifact`` its ID model,
    ``weights`` its selected adapter weights (path or URI). The adapter is built as its Train run
    built it (same builder, same seed), so "before" is the run's starting point."""
    from idle_ray.data.genres import dense_genres, read_genres
    from idle_ray.train import builders
    from idle_ray.train.weights import load_weights

    model = builders.build_adapter_task(cfg, prepared, artifact)
    genres = dense_genres(prepared.file("vocab", "items.parquet"), read_genres(cfg.data.dataset, cfg.data.items_path))
    return representation_map(model, load_weights(weights), prepared.item_titles(), genres, seed=cfg.seed)
