"""Name -> ID sequential model class, and the one builder the rest of the system calls."""

from __future__ import annotations

from torch import nn

from idle_ray.models.caser import Caser
from idle_ray.models.gru4rec import GRU4Rec
from idle_ray.models.sasrec import SASRec

ID_MODELS: dict[str, type[nn.Module]] = {"sasrec": SASRec, "gru4rec": GRU4Rec, "caser": Caser}


def build_id_model(name: str, num_items: int, **kwargs) -> nn.Module:
    """Build the ID model ``name`` for ``num_items`` items; ``kwargs`` go to its constructor.

    Raises ValueError for an unknown name (listing the choices); a keyword the model does not
    take raises TypeError from its constructor.
    """
    if name not in ID_MODELS:
        raise ValueError(f"unknown ID model {name!r}; choices: {', '.join(sorted(ID_MODELS))}")
    return ID_MODELS[name](num_items, **kwargs)
