"""THE trainable predicate (the ``adapter.`` prefix) and IDLEModel's use of it: optimizer list, counts, checkpoint.

Trainable = parameters whose name starts with ``adapter.`` (:func:`is_trainable`); the same
predicate sets ``requires_grad``, builds the optimizer's list and filters the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from torch import Tensor, nn

ADAPTER_PREFIX = "adapter."


def is_trainable(name: str) -> bool:
    """THE predicate: a parameter (or checkpoint entry) trains iff it belongs to the adapter."""
    return name.startswith(ADAPTER_PREFIX)


class AdapterStateMixin:
    """The trainable-part methods of :class:`idle_ray.adapter.model.IDLEModel` (an ``nn.Module``
    whose ``adapter`` submodule holds everything that trains; ``variant``, ``prompt_length``,
    ``backbone``, ``mmd_layers`` and ``fusion`` go into the checkpoint's metadata)."""

    def is_trainable(self, name: str) -> bool:
        return is_trainable(name)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The optimizer's parameter list (same predicate as ``requires_grad`` and checkpoints)."""
        return [p for n, p in self.named_parameters() if is_trainable(n)]

    def parameter_counts(self) -> dict[str, int]:
        counts = {"trainable": 0, "frozen": 0}
        for name, param in self.named_parameters():
            counts["trainable" if is_trainable(name) else "frozen"] += param.numel()
        return counts

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Checkpoint content: the trainable entries of ``state_dict()``, full names."""
        return {k: v for k, v in self.state_dict().items() if is_trainable(k)}

    def load_adapter_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load an :meth:`adapter_state_dict`; keys must match exactly."""
        expected = set(self.adapter_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(f"adapter checkpoint mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        self.load_state_dict(dict(state), strict=False)

    def checkpoint_metadata(self) -> dict[str, str]:
        return {
            "variant": self.variant,
            "prompt_length": str(self.prompt_length),
            "hidden_size": str(self.backbone.hidden_size),
            "backbone": self.backbone.name,
            "mmd_layers": json.dumps(list(self.mmd_layers)),
            "fusion": self.fusion,
        }

    def save_adapter(self, path: str) -> None:
        """Write the trainable part as safetensors (with variant/shape metadata)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        save_file(tensors, str(path), metadata=self.checkpoint_metadata())

    def load_adapter(self, path: str) -> None:
        """Read :meth:`save_adapter` output; the variant and prompt length must match."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        mine = self.checkpoint_metadata()
        for key in ("variant", "prompt_length", "hidden_size", "fusion"):
            if key in meta and meta[key] != mine[key]:
                raise ValueError(f"adapter checkpoint {key}={meta[key]!r} does not match this model's {mine[key]!r}")
        device = next(self.adapter.parameters()).device
        self.load_adapter_state_dict(load_file(str(path), device=str(device)))
