"""Similarity maps and the prototype decoder (docs/METHOD.md §3.5).

The decoder's three 3x3 convolutions dominate QAMP's head (the background decoder has ~650 channels
at 64 x 64 and runs twice per training step). On the CPU they are computed with Winograd's minimal
filtering F(2x2, 3x3) (Lavin & Gray, 2016): the same convolution, equal up to float rounding, with
16 batched matrix products of 2.25x fewer multiplications than the direct method
(``conv3x3_winograd``; ``decoder_winograd=False`` uses ``nn.Conv2d``). On CUDA, cuDNN chooses its own
algorithm and ``nn.Conv2d`` is always used.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.sampling import dropout

# Winograd F(2x2, 3x3) filter transform G (4 x 3); the input transform B^T and output transform A^T
# (B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]], A^T = [[1,1,1,0],[0,1,-1,-1]]) are only
# additions and are written out in _input_transform / _output_transform.
WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _input_transform(x: torch.Tensor) -> torch.Tensor:
    """``B^T d B`` of every 4 x 4 tile (stride 2) of a padded ``N x C x (2a+2) x (2b+2)`` input.

    Returns ``4 x 4 x N x C x a x b`` (tile row transform, tile column transform, ...).
    """
    def along(t: torch.Tensor, dim: int) -> torch.Tensor:  # 1-D transform of the tiles along ``dim``
        def rows(start: int, stop: int | None) -> torch.Tensor:
            index = [slice(None)] * t.dim()
            index[dim] = slice(start, stop, 2)
            return t[tuple(index)]
        e0, e1, o0, o1 = rows(0, -2), rows(2, None), rows(1, -2), rows(3, None)  # d0, d2, d1, d3 per tile
        return torch.stack([e0 - e1, o0 + e1, e1 - o0, o0 - o1])
    return along(along(x, 2), 4).transpose(0, 1)  # (4, 4, N, C, a, b)


def _output_transform(m: torch.Tensor) -> torch.Tensor:
    """``A^T m A`` of every tile: ``4 x 4 x O x N x a x b -> N x O x 2a x 2b``."""
    rows = torch.stack([m[0] + m[1] + m[2], m[1] - m[2] - m[3]])  # (2, 4, O, N, a, b)
    tiles = torch.stack([rows[:, 0] + rows[:, 1] + rows[:, 2], rows[:, 1] - rows[:, 2] - rows[:, 3]], dim=1)
    _, _, O, N, a, b = tiles.shape  # (2 [row in tile], 2 [column in tile], O, N, a, b)
    return tiles.permute(3, 2, 4, 0, 5, 1).reshape(N, O, 2 * a, 2 * b)


def conv3x3_winograd(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=1)`` (no bias, stride 1) by Winograd F(2x2, 3x3).

    Args:
        x: ``N x C x H x W`` (any ``H``, ``W`` >= 1).
        weight: ``O x C x 3 x 3``.

    Returns:
        ``N x O x H x W``, equal to the direct convolution up to float rounding; differentiable.
    """
    if weight.shape[-2:] != (3, 3) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv3x3_winograd: expected weight O x {x.shape[1]} x 3 x 3, got {tuple(weight.shape)}")
    N, C, H, W = x.shape
    O = weight.shape[0]
    padded = F.pad(x, (1, 1 + W % 2, 1, 1 + H % 2))  # (N, C, 2a + 2, 2b + 2), a = ceil(H / 2)
    v = _input_transform(padded)  # (4, 4, N, C, a, b)
    a, b = v.shape[-2:]
    v = v.transpose(2, 3).reshape(16, C, N * a * b)
    g = torch.tensor(WINOGRAD_G, dtype=weight.dtype, device=weight.device)
    u = torch.einsum("ij,ocjk,lk->iloc", g, weight, g).reshape(16, O, C)  # G w G^T per filter
    m = torch.bmm(u, v).reshape(4, 4, O, N, a, b)
    return _output_transform(m)[:, :, :H, :W]


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
    ``out_conv`` 3x3 ``hidden -> out_width`` + ReLU; channel dropout; ``head`` 1x1 ``out_width -> 1``.

    Args:
        n_prototypes: ``P`` input channels.
        hidden: width (the reference uses ``P - 2``: the number of sampled prototypes).
        p: channel-dropout probability (drawn from the caller's generator); QAMP 0.2 (its
            models/modules.py L42), GMRD 0.1 (moudles.py L39).
        winograd: compute the 3x3 convolutions with ``conv3x3_winograd`` on the CPU (same numbers up
            to float rounding, faster); the parameters are ``nn.Conv2d``'s either way.
        out_width: channels of ``out_conv``; None = ``hidden`` (QAMP, modules.py L40). GMRD's decoder
            narrows to a literal 100 whatever ``hidden`` (GMRD moudles.py L37, L40).
    """

    def __init__(self, n_prototypes: int, hidden: int, p: float, winograd: bool = True,
                 out_width: int | None = None):
        super().__init__()
        out_width = hidden if out_width is None else out_width
        self.in_conv = nn.Conv2d(n_prototypes, hidden, kernel_size=1, bias=False)
        self.res_conv1 = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, bias=False)
        self.res_conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, bias=False)
        self.out_conv = nn.Conv2d(hidden, out_width, kernel_size=3, padding=1, bias=False)
        self.head = nn.Conv2d(out_width, 1, kernel_size=1, bias=False)
        self.p = p
        self.winograd = winograd

    def _conv3x3(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        if self.winograd and x.device.type == "cpu":
            return conv3x3_winograd(x, conv.weight)
        return conv(x)

    def forward(self, sim: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``N x P x h x w -> N x 1 x h x w`` logits."""
        x = F.relu(self.in_conv(sim))
        x = x + F.relu(self._conv3x3(self.res_conv2, F.relu(self._conv3x3(self.res_conv1, x))))
        x = F.relu(self._conv3x3(self.out_conv, x))
        x = dropout(x, self.p, self.training, generator, channelwise=True)
        return self.head(x)
