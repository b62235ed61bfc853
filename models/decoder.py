"""Similarity maps and the prototype decoder (QAMP_REFERENCE section 2.6)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.sampling import dropout


def cosine_maps(feats: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every position with every prototype.

    Args:
        feats: ``N x C x h x w``; prototypes: ``N x P x C``.

    Returns:
        ``N x P x h x w`` in ``[-1, 1]``.
    """
    return torch.einsum("npc,nchw->nphw", F.normalize(prototypes, dim=-1), F.normalize(feats, dim=1))


class SimilarityDecoder(nn.Module):
    """``P``-channel similarity map -> one logit map. All convolutions bias-free.

    ``in_conv`` 1x1 ``P -> hidden`` + ReLU; residual ``res_conv1``/``res_conv2`` 3x3 + ReLU;
    ``out_conv`` 3x3 + ReLU; channel dropout; ``head`` 1x1 ``hidden -> 1``.

    Args:
        n_prototypes: ``P`` input channels.
        hidden: width (the reference uses ``P - 2``: the number of sampled prototypes).
        p: channel-dropout probability (drawn from the caller's generator).
    """

    def __init__(self, n_prototypes: int, hidden: int, p: float):
        super().__init__()
        self.in_conv = nn.Conv2d(n_prototypes, hidden, kernel_size=1, bias=False)
        self.res_conv1 = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, bias=False)
        self.res_conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, bias=False)
        self.out_conv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, bias=False)
        self.head = nn.Conv2d(hidden, 1, kernel_size=1, bias=False)
        self.p = p

    def forward(self, sim: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``N x P x h x w -> N x 1 x h x w`` logits."""
        x = F.relu(self.in_conv(sim))
        x = x + F.relu(self.res_conv2(F.relu(self.res_conv1(x))))
        x = F.relu(self.out_conv(x))
        x = dropout(x, self.p, self.training, generator, channelwise=True)
        return self.head(x)
