"""MGSP -- Mask Guided Support Prototypes (docs/METHOD.md §3.2 and §3.3).

For one class (foreground: mask ``M``, band ``IE``; background: mask ``1 - M``, band ``OE``) the
support side of the prototype set is, in this order::

    MLP prototypes (n_keep of n_mlp) | edge samples (n_edge) | MAP(mask) | MAP(band)

The MLP prototypes come from the *fill map*: ``up(Fs)`` with every position outside the mask
overwritten by a randomly drawn in-mask vector, flattened to ``C x (H*W)`` and passed through
``Linear(H*W, n) -> Dropout -> Linear(n, n)`` (one prototype per output column).

The fill map is a linear function of the ``h x w`` features: column ``p`` is column ``src(p)`` of
``up(Fs)`` (``src(p) = p`` inside the mask, a drawn in-mask position outside), and each column of
``up(Fs)`` mixes 4 feature columns with bilinear weights ``U[q]``. So the first ``Linear`` is
computed as ``Fs @ W_eff^T`` with ``W_eff = sum_p W1[:, p] U[src(p)]`` (``K x h*w``), never
forming the ``C x H*W`` map (``fast=True``, see ``_fill_weight``). ``fast=False`` forms it the
reference way; both give the same numbers up to float rounding (tests/test_models.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.sampling import UpsampleGrid, draw_positions, dropout

N_MAP = 2  # MAP prototypes per class: over the class mask and over its edge band
# The authors' edge bands: cv2.erode / cv2.dilate with a 3 x 3 ones kernel, iterations=2 (QAMP
# models/qamp.py L296 and L329), on their 256 x 256 slices: a band 2 px wide, 1/128 of the side.
REFERENCE_SIZE = 256
REFERENCE_BAND_WIDTH = 2  # px at REFERENCE_SIZE (iterations x kernel radius = 2 x 1)


def band_iterations(edge_iters: int | None, kernel: int, image_size: tuple[int, int]) -> int:
    """Erosion / dilation iterations of the edge bands of ``image_size`` masks.

    ``edge_iters`` given: used as is. None: the authors' band width relative to the slice,
    ``REFERENCE_BAND_WIDTH * S / REFERENCE_SIZE`` px with ``S = (H + W) / 2``, in steps of the
    kernel radius, rounded to the nearest whole step and at least one (a band cannot be thinner
    than one pixel): 256 px -> 2 (the authors'), 128 -> 1, 64 -> 1 (1 px where the authors' band
    would be 0.5 px), 512 -> 4. A 1 x 1 kernel makes empty bands whatever the count.
    """
    if edge_iters is not None:
        return int(edge_iters)
    radius = kernel // 2
    if radius == 0:
        return 1
    width = REFERENCE_BAND_WIDTH * (image_size[0] + image_size[1]) / 2 / REFERENCE_SIZE
    return max(1, int(round(width / radius)))


def erode(masks: torch.Tensor, kernel: int, iterations: int) -> torch.Tensor:
    """Binary erosion with a ``kernel x kernel`` ones element (outside the image does not erode).

    Args: masks ``S x H x W`` in {0, 1}. Returns the same shape, on the same device.
    """
    x = masks[:, None]
    for _ in range(iterations):
        x = -F.max_pool2d(-x, kernel, stride=1, padding=kernel // 2)
    return x[:, 0]


def dilate(masks: torch.Tensor, kernel: int, iterations: int) -> torch.Tensor:
    """Binary dilation with a ``kernel x kernel`` ones element. ``S x H x W -> S x H x W``."""
    x = masks[:, None]
    for _ in range(iterations):
        x = F.max_pool2d(x, kernel, stride=1, padding=kernel // 2)
    return x[:, 0]


def edge_bands(masks: torch.Tensor, kernel: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner band ``M - erode(M)`` and outer band ``dilate(M) - M`` of ``S x H x W`` masks in {0, 1}."""
    return masks - erode(masks, kernel, iterations), dilate(masks, kernel, iterations) - masks


class PrototypeMLP(nn.Module):
    """``Linear(H*W, n) -> Dropout(p) [-> ReLU] -> Linear(n, n)`` applied to each channel row of a fill map.

    Args:
        n_positions: ``H * W`` of the images the model is built for.
        n_prototypes: ``n`` learned prototypes.
        p: dropout probability (drawn from the caller's generator).
        relu: a ReLU after the dropout: GMRD at 45ba5c2 (moudles.py L12); QAMP has none (its
            models/modules.py L14 comments it out, as GMRD's later commit 6d42639 does).
    """

    def __init__(self, n_positions: int, n_prototypes: int, p: float, relu: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(n_positions, n_prototypes)
        self.fc2 = nn.Linear(n_prototypes, n_prototypes)
        self.p = p
        self.relu = relu

    def second_layer(self, hidden: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Everything after ``fc1``: dropout (drawn from ``generator`` in training), ReLU when set, ``fc2``."""
        hidden = dropout(hidden, self.p, self.training, generator)
        return self.fc2(F.relu(hidden) if self.relu else hidden)

    def forward(self, fill_map: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reference computation: ``C x (H*W) -> C x n``."""
        return self.second_layer(self.fc1(fill_map), generator)


def folded_weight(mlp: PrototypeMLP, grid: UpsampleGrid) -> torch.Tensor:
    """``W1 @ U``: the first MLP layer folded with bilinear upsampling, ``n x (h*w)``.

    Depends on the weights only, so one call serves every MLP use of a training step.
    """
    w1 = mlp.fc1.weight
    return grid.adjoint(w1.reshape(-1, grid.H, grid.W)).reshape(w1.shape[0], -1)


def mlp_prototypes(mlp: PrototypeMLP, feats: torch.Tensor, mask: torch.Tensor, grid: UpsampleGrid,
                   generator: torch.Generator, fast: bool = True,
                   folded: torch.Tensor | None = None) -> torch.Tensor:
    """Learned prototypes of one class from its fill map.

    Args:
        mlp: the class's ``PrototypeMLP``.
        feats: ``C x h x w`` features of the image the mask belongs to.
        mask: ``H x W`` class mask in {0, 1}.
        grid: upsampling of ``h x w`` to ``H x W``.
        generator: draws the fill positions (then the dropout mask in training).
        fast: fold upsampling and fill into the weight (see module docstring); False = reference way.
        folded: ``folded_weight(mlp, grid)`` if already computed (fast path only).

    Returns:
        ``n x C`` prototypes (``n = mlp.fc2.out_features``).
    """
    C = feats.shape[0]
    inside = mask.reshape(-1) == 1  # (H*W,)
    outside = torch.nonzero(~inside).squeeze(1)  # positions to overwrite, raster order
    sources = draw_positions(inside, outside.numel(), generator)  # (n_out,) or None: zeros there
    if fast:
        hidden = feats.reshape(C, -1) @ _fill_weight(mlp, inside, outside, sources, grid, folded).T + mlp.fc1.bias
    else:
        up = grid.up(feats[None])[0].reshape(C, -1)  # (C, H*W)
        fill = up * inside.to(up.dtype)
        if sources is not None and outside.numel() > 0:
            fill[:, outside] = up[:, sources]
        hidden = mlp.fc1(fill)  # (C, n)
    out = mlp.second_layer(hidden, generator)  # (C, n)
    return out.T


def _fill_weight(mlp: PrototypeMLP, inside: torch.Tensor, outside: torch.Tensor, sources: torch.Tensor | None,
                 grid: UpsampleGrid, folded: torch.Tensor | None) -> torch.Tensor:
    """``W_eff`` (``n x h*w``) with ``fill_map @ W1^T == F @ W_eff^T``.

    Position ``p`` of the fill map holds ``up(F)[:, src(p)]``, so ``W_eff = sum_p W1[:, p] U[src(p)]``
    (``U[q]``: the 4 bilinear weights of position ``q``). Two equal ways, the cheaper one is taken:
    * few positions outside the mask: ``W1 @ U`` (``folded``) corrected at those positions;
    * otherwise: move each column of W1 to its source, then spread the in-mask columns.
    """
    w1 = mlp.fc1.weight  # (n, H*W)
    n_out = outside.numel()
    if n_out == 0:
        return folded if folded is not None else folded_weight(mlp, grid)
    if 2 * n_out < inside.numel():
        base = folded if folded is not None else folded_weight(mlp, grid)
        moved = w1.index_select(1, outside)  # (n, n_out)
        if sources is None:
            return base - grid.scatter_columns(moved, outside)
        return base + grid.scatter_columns(torch.cat([moved, -moved], dim=1), torch.cat([sources, outside]))
    in_positions = torch.nonzero(inside).squeeze(1)
    if sources is None:  # nothing inside: the fill map is zero outside
        return grid.scatter_columns(w1.index_select(1, in_positions), in_positions)
    source_of = torch.arange(inside.numel(), device=inside.device)
    source_of[outside] = sources
    rank = torch.cumsum(inside, dim=0) - 1  # position -> index among the in-mask positions
    compact = w1.new_zeros(w1.shape[0], in_positions.numel()).index_add(1, rank[source_of], w1)  # (n, n_in)
    return grid.scatter_columns(compact, in_positions)


def sampled_columns(feats: torch.Tensor, region: torch.Tensor, n: int, grid: UpsampleGrid,
                    generator: torch.Generator) -> torch.Tensor:
    """``n`` vectors of ``up(feats)`` drawn inside ``region`` (zeros when it is empty).

    Args: feats ``C x h x w``; region ``H x W`` bool. Returns ``n x C``.
    """
    positions = draw_positions(region.reshape(-1), n, generator)
    if positions is None:
        return feats.new_zeros(n, feats.shape[0])
    return grid.columns(feats, positions)


def kept_columns(n: int, n_keep: int, generator: torch.Generator) -> torch.Tensor:
    """The ``n_keep`` of ``n`` learned prototypes kept, in random order (one ``randperm`` draw).

    QAMP's ``random.sample(range(len(fg_prototypes)), 50)`` (its models/qamp.py L308, L341): a random
    order even when every prototype is kept (``n_keep == n``), unlike GMRD, which keeps all in order.
    """
    return torch.randperm(n, generator=generator, device=generator.device)[:n_keep]


def class_support_prototypes(feats: torch.Tensor, mask: torch.Tensor, band: torch.Tensor,
                             mlp: PrototypeMLP | None, n_keep: int | None, n_edge: int, grid: UpsampleGrid,
                             generator: torch.Generator, fast_mlp: bool = True,
                             folded: torch.Tensor | None = None) -> torch.Tensor:
    """Support part of one class's prototype set for one shot.

    Draw order: fill positions, MLP dropout (training), kept MLP columns, edge samples; a part that
    is absent draws nothing (``mlp`` None: no fill, dropout or kept columns; ``n_keep`` None: all
    MLP columns in order, no draw; ``n_edge`` 0: no edge draw).

    Args:
        feats: ``C x h x w``; mask: ``H x W`` class mask in {0, 1}; band: ``H x W`` weights of its
            edge band (QAMP: {0, 1}; edge samples are drawn where ``band == 1``).
        mlp: the class's MLP, or None (no learned prototypes).
        n_keep: learned prototypes kept at random (QAMP), or None: all, in order (GMRD).
        n_edge: vectors drawn in the band.
        folded: ``folded_weight(mlp, grid)`` when already computed for this step.

    Returns:
        ``(n_learned + n_edge + N_MAP) x C``: kept MLP | edge samples | MAP(mask) | MAP(band).
    """
    parts = []
    if mlp is not None:
        learned = mlp_prototypes(mlp, feats, mask, grid, generator, fast_mlp, folded)  # (n, C)
        if n_keep is not None:
            learned = learned[kept_columns(learned.shape[0], n_keep, generator).to(learned.device)]
        parts.append(learned)
    if n_edge > 0:
        parts.append(sampled_columns(feats, band == 1, n_edge, grid, generator))  # (n_edge, C)
    parts.append(grid.masked_average(feats[None].expand(2, -1, -1, -1), torch.stack([mask, band])))  # (2, C)
    return torch.cat(parts)
