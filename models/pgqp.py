"""PGQP -- Prior Guided Query Prototypes (docs/METHOD.md §3.4).

Vectors of the upsampled query features drawn where the QPG prior is confident: foreground
where ``P0 > tau_fg``, background where ``1 - P0 > tau_bg``.
"""
from __future__ import annotations

import torch

from models.mgsp import sampled_columns
from models.sampling import UpsampleGrid


def query_prototypes(query_feats: torch.Tensor, confidence: torch.Tensor, tau: float, n: int,
                     grid: UpsampleGrid, generator: torch.Generator) -> torch.Tensor:
    """``n`` query vectors drawn where ``confidence > tau``.

    Args:
        query_feats: ``C x h x w`` features of one query image.
        confidence: ``H x W`` class probability (``P0`` for foreground, ``1 - P0`` for background).
        tau: threshold in ``[0, 1)``.
        n: number of prototypes.
        generator: the draws' source.

    Returns:
        ``n x C``; zeros when no position passes ``tau``; repeats when fewer than ``n`` do.
    """
    return sampled_columns(query_feats, confidence > tau, n, grid, generator)
