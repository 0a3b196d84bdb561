"""Dimensionality alignment: one ID-model user state -> k tokens in the LLM's width.

``h = reshape(W2 · GELU(W1 · u + b1) + b2, (k, D))`` with ``W1 ∈ R^{w×d}``, ``W2 ∈ R^{kD×w}``
(DESIGN §1 (2)); ``w`` is the projection width. Default PyTorch initialisation: ``h`` is the
starting point of every layer's ID tokens, so it must not be zero (the refinement that follows
is the zero-initialised part).
"""

from __future__ import annotations

from torch import Tensor, nn


class DimensionAlignment(nn.Module):
    """Map a user state ``u (B, d)`` to ``h (B, k, D)``.

    Args:
        id_dim: ``d``, the ID model's hidden size.
        hidden_size: ``D``, the LLM's hidden size.
        prompt_length: ``k``, the number of ID tokens.
        projection_width: ``w``, the MLP's inner width.
    """

    def __init__(self, id_dim: int, hidden_size: int, prompt_length: int, projection_width: int):
        super().__init__()
        if prompt_length < 1:
            raise ValueError(f"prompt_length must be >= 1, got {prompt_length}")
        self.prompt_length = prompt_length
        self.hidden_size = hidden_size
        self.fc_in = nn.Linear(id_dim, projection_width)  # W1, b1
        self.act = nn.GELU()
        self.fc_out = nn.Linear(projection_width, prompt_length * hidden_size)  # W2, b2

    def forward(self, user_state: Tensor) -> Tensor:
        """``user_state (B, d)`` -> ``h (B, k, D)``."""
        out = self.fc_out(self.act(self.fc_in(user_state)))  # (B, k * D)
        return out.view(-1, self.prompt_length, self.hidden_size)  # (B, k, D)
