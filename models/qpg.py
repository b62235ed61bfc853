"""QPG -- Query Prior Generation (docs/METHOD.md §3.1).

``P0 = 1 - sigmoid(temperature * (-scaler * cos(Fq, p0) - t))`` at feature resolution, where
``p0`` is the masked average of the upsampled support features and ``t`` the query's threshold.
The same map, upsampled, is the ADNet prediction used when the support mask is empty.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def query_prior(query_feats: torch.Tensor, prototype: torch.Tensor, threshold: torch.Tensor,
                scaler: float, temperature: float) -> torch.Tensor:
    """Foreground probability of every query position from one foreground prototype.

    Args:
        query_feats: ``N x C x h x w`` query features.
        prototype: ``C`` or ``N x C`` foreground prototype ``p0``.
        threshold: ``N`` per-image thresholds ``t`` (encoder's threshold head).
        scaler: cosine-similarity scale (reference 20).
        temperature: sigmoid slope (reference 0.5).

    Returns:
        ``N x h x w`` probabilities in ``[0, 1]``.
    """
    proto = prototype.expand(query_feats.shape[0], -1) if prototype.dim() == 1 else prototype
    anomaly = -scaler * F.cosine_similarity(query_feats, proto[:, :, None, None], dim=1)  # (N, h, w)
    return 1.0 - torch.sigmoid(temperature * (anomaly - threshold[:, None, None]))
