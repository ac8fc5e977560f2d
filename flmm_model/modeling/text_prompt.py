"""The text prompt of SAM: a phrase's LMM hidden states -> SAM sparse prompt tokens, one per phrase token (the hidden
states of every decoder layer mixed by learnable softmax weights, then Linear(D -> P)), as F-LMM's text projector."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TextPromptProjector(nn.Module):
    """Softmax-weighted mix over LMM layers, then Linear(hidden_size -> prompt_dim).

    Args:
        num_layers: number of LMM decoder layers whose outputs are mixed (embedding output excluded).
        hidden_size: LMM hidden size D.
        prompt_dim: SAM prompt embedding size P (256 for the released SAM checkpoints).
    """

    def __init__(self, *, num_layers: int, hidden_size: int, prompt_dim: int) -> None:
        super().__init__()
        if num_layers < 1 or hidden_size < 1 or prompt_dim < 1:
            raise ValueError(f"TextPromptProjector: num_layers, hidden_size and prompt_dim must be >= 1, found "
                             f"{num_layers}, {hidden_size}, {prompt_dim}")
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.prompt_dim = prompt_dim
        # Pre-softmax logits of the layer weights; zeros give equal weights 1 / num_layers at init.
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))
        self.proj = nn.Linear(hidden_size, prompt_dim)

    @property
    def layer_weights(self) -> Tensor:
        """(num_layers,) softmax weights of the layers, summing to 1."""
        return self.layer_logits.softmax(dim=0)

    def forward(self, phrase_hidden: Tensor) -> Tensor:
        """Project one phrase's tokens to SAM sparse prompt tokens.

        Args:
            phrase_hidden: (num_layers, T, D) hidden states of the phrase's T tokens at every decoder layer's
                output (any float dtype; cast to the projection's dtype). Extra middle dims are allowed:
                (num_layers, *, D).

        Returns:
            (T, prompt_dim) prompt tokens (or (*, prompt_dim)) in the projection's dtype.
        """
        if phrase_hidden.dim() < 2 or phrase_hidden.shape[0] != self.num_layers \
                or phrase_hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"TextPromptProjector: expected phrase_hidden of shape ({self.num_layers}, T, "
                             f"{self.hidden_size}), found {tuple(phrase_hidden.shape)}")
        hidden = phrase_hidden.to(self.proj.weight.dtype)
        weights = self.layer_weights.to(hidden.dtype)
        mixed = torch.einsum("l,l...d->...d", weights, hidden)  # (num_layers, T, D) -> (T, D)
        return self.proj(mixed)  # (T, prompt_dim)
