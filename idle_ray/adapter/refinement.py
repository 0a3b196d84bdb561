"""Layer-wise embedding refinement, and the hooks that put ID tokens into a frozen LLM.

Refinement (DESIGN §1 (3)): for each refined layer ``l``, ``p^(l) = h + G_l(LN(h))`` with
``G_l`` a per-layer bottleneck MLP (``LN -> Linear(D, r) -> GELU -> Linear(r, D)``) whose output
layer is zero-initialised, so at initialisation every refined layer receives exactly ``h``.

Injection: at the input of layer ``l`` the hidden states at the ID-token positions are
*replaced* by ``p^(l)`` (deep-prompt style). Layer inputs are reached with forward pre-hooks
(``with_kwargs=True``), so any Hugging Face block works whether it takes ``hidden_states``
positionally (Llama, GPT-2, BERT, OPT) or as a keyword. Hooks live only inside the
``inject_layer_inputs`` / ``capture_layer_inputs`` context managers: on exit (also on error)
every handle is removed and the bare model is exactly restored.

Positions are given in flat form — ``batch_index (M,)`` and ``time_index (M,)`` — so the same
hook serves a fixed block of ``k`` ID tokens per row (IDLE) and a ragged set of per-item slots
(LLaRA).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class RefinementBlock(nn.Module):
    """``G_l`` plus the residual: ``p = h + up(GELU(down(LN(h))))``; ``up`` starts at zero.

    Args:
        hidden_size: ``D``.
        bottleneck: ``r``, the inner width of ``G_l``.
    """

    def __init__(self, hidden_size: int, bottleneck: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)  # zero output: the block starts as the identity on h
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        """``h (B, k, D)`` -> ``p (B, k, D)``."""
        return h + self.up(self.act(self.down(self.norm(h))))


class LayerwiseRefinement(nn.Module):
    """One :class:`RefinementBlock` per refined layer.

    Args:
        hidden_size: ``D``.
        layer_ids: indices of the refined layers (into the backbone's block list).
        bottleneck: ``r`` of every ``G_l``.
    """

    def __init__(self, hidden_size: int, layer_ids: Sequence[int], bottleneck: int):
        super().__init__()
        self.layer_ids = tuple(int(i) for i in layer_ids)
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"duplicate refined layers: {self.layer_ids}")
        self.blocks = nn.ModuleDict({str(i): RefinementBlock(hidden_size, bottleneck) for i in self.layer_ids})

    def forward(self, h: Tensor) -> list[Tensor]:
        """``h (B, k, D)`` -> ``[p^(layer) (B, k, D) for layer in layer_ids]``.

        A list, not a dict keyed by layer: DeepSpeed ZeRO-3's module hooks walk dict outputs
        assuming string keys.
        """
        return [self.blocks[str(i)](h) for i in self.layer_ids]


# --------------------------------------------------------------------------- hooks


def _layer_input(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise TypeError("cannot find the layer's hidden states (first positional arg or `hidden_states=`)")


def _with_layer_input(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def replace_positions(hidden: Tensor, batch_index: Tensor, time_index: Tensor, values: Tensor) -> Tensor:
    """Out-of-place copy of ``hidden (B, T, D)`` with rows ``(batch_index, time_index)`` (M,) set
    to ``values (M, D)``; gradients flow to ``values`` and to the untouched positions."""
    return hidden.index_put((batch_index, time_index), values.to(hidden.dtype))


@contextmanager
def inject_layer_inputs(
    layers: nn.ModuleList,
    values_by_layer: Mapping[int, Tensor],
    batch_index: Tensor,
    time_index: Tensor,
):
    """Within the block, layer ``l``'s input hidden states at ``(batch_index, time_index)`` (M,)
    are replaced by ``values_by_layer[l] (M, D)``. Hooks are removed on exit."""
    handles = []

    def make_hook(values: Tensor):
        def hook(module, args, kwargs):
            hidden = _layer_input(args, kwargs)  # (B, T, D)
            return _with_layer_input(args, kwargs, replace_positions(hidden, batch_index, time_index, values))

        return hook

    try:
        for layer_id, values in values_by_layer.items():
            handles.append(layers[layer_id].register_forward_pre_hook(make_hook(values), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_layer_inputs(
    layers: nn.ModuleList,
    layer_ids: Sequence[int],
    batch_index: Tensor,
    time_index: Tensor,
):
    """Yield a dict that, after the forward, maps each ``layer_id`` to that layer's input hidden
    states at ``(batch_index, time_index)``: ``(M, D)``, detached (stop-gradient). Hooks are
    removed on exit. Register before :func:`inject_layer_inputs` to see pre-injection states."""
    captured: dict[int, Tensor] = {}
    handles = []

    def make_hook(layer_id: int):
        def hook(module, args, kwargs):
            hidden = _layer_input(args, kwargs)  # (B, T, D)
            captured[layer_id] = hidden[batch_index, time_index].detach()  # (M, D)

        return hook

    try:
        for layer_id in layer_ids:
            handles.append(layers[layer_id].register_forward_pre_hook(make_hook(layer_id), with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def block_positions(start: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Flat ``(batch_index, time_index)`` of ``length`` consecutive columns from ``start (B,)``;
    both ``(B * length,)``, row-major, matching ``values.reshape(B * length, D)``."""
    batch = start.shape[0]
    offsets = torch.arange(length, device=start.device)
    batch_index = torch.arange(batch, device=start.device).repeat_interleave(length)  # (B * k,)
    time_index = (start.unsqueeze(1) + offsets.unsqueeze(0)).reshape(-1)  # (B * k,)
    return batch_index, time_index
