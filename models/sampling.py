"""Random draws and the bilinear-upsampling algebra shared by every QAMP component.

Two kinds of helpers live here:

* ``draw_positions`` -- the ONE sampler used for every random prototype (MLP fill map, edge
  bands, prior-guided query samples) and ``dropout`` -- generator-driven dropout. Both draw
  from an explicit ``torch.Generator``; nothing here touches a global random stream.
* ``UpsampleGrid`` -- bilinear upsampling (``align_corners=True``; the SSL-ALPNet head uses its
  ``align_corners=False`` form, up and down) of ``h x w`` features to the
  mask size ``H x W`` written as two small matrices ``Uy (H x h)`` and ``Ux (W x w)``:
  ``up(F) = Uy @ F @ Ux^T`` per channel. With it, masked average pooling, single columns of
  ``up(F)`` and the MLP over the upsampled map are computed from the ``h x w`` features without
  ever forming the ``C x H x W`` upsampled tensor.

Deterministic kernels (``deterministic=True`` must repeat bit for bit on CUDA too): the backward of
bilinear ``F.interpolate`` and ``F.nll_loss`` on 2-D maps accumulate with atomic adds on CUDA and have
no deterministic CUDA kernel (torch.use_deterministic_algorithms's list). Off the CPU, ``up`` is
therefore the matrix product ``Uy @ F @ Ux^T`` (and ``models.losses.nll_loss`` a weighted sum): the
same numbers up to float rounding. On the CPU torch's own kernels, deterministic there, are kept
(:func:`torch_kernels`), so CPU results are bit for bit what they were.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

MAP_EPS = 1e-5  # denominator guard of masked average pooling (reference value)


def draw_positions(candidates: torch.Tensor, n: int, generator: torch.Generator) -> Optional[torch.Tensor]:
    """Draw ``n`` flat positions among the ``True`` entries of ``candidates``.

    The rule of the reference sampler, with an explicit generator:
    * at least ``n`` candidates: ``n`` distinct candidates in random order;
    * ``0 < count < n``: a random subset of ``n mod count`` candidates, followed by all candidates
      (in raster order) repeated ``n // count`` times;
    * no candidate: ``None`` (callers use zero vectors then).

    Args:
        candidates: bool ``(L,)`` (a flattened ``H x W`` mask).
        n: number of positions wanted (>= 0).
        generator: the ``torch.Generator`` to draw from (any device).

    Returns:
        int64 ``(n,)`` positions in ``[0, L)`` on ``candidates.device``, or ``None``.
    """
    index = torch.nonzero(candidates.reshape(-1)).squeeze(1)  # (count,) raster order
    count = index.numel()
    if n == 0:
        return index[:0]
    if count == 0:
        return None
    order = torch.randperm(count, generator=generator, device=generator.device).to(index.device)
    if count >= n:
        return index[order[:n]]
    repeats, rest = divmod(n, count)
    return torch.cat([index[order[:rest]], index.repeat(repeats)])


def dropout(x: torch.Tensor, p: float, training: bool, generator: Optional[torch.Generator],
            channelwise: bool = False) -> torch.Tensor:
    """Inverted dropout whose mask is drawn from ``generator`` (``Dropout2d`` when ``channelwise``).

    Args:
        x: any tensor; with ``channelwise`` it is ``N x C x H x W`` and whole channels are dropped.
        p: drop probability in ``[0, 1)``.
        training: identity when False.
        generator: required when ``training`` and ``p > 0``.
    """
    if not training or p == 0.0:
        return x
    if generator is None:
        raise ValueError("dropout in training mode needs a torch.Generator: pass generator=models.make_generator(seed)")
    shape = (*x.shape[:2], 1, 1) if channelwise else x.shape
    keep = torch.rand(shape, generator=generator, device=generator.device).to(x.device) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


def torch_kernels(device: torch.device) -> bool:
    """True where ``F.interpolate`` / ``F.nll_loss`` are used (the CPU: deterministic there, and what
    every CPU result was computed with); elsewhere the deterministic formulations (module docstring)."""
    return device.type == "cpu"


def _linear_weights(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype, align_corners: bool = True):
    """Source indices and weights of 1-D linear interpolation, as PyTorch's bilinear kernel computes them.

    ``align_corners=True``: ``src = dst * (n_in - 1) / (n_out - 1)``. ``align_corners=False`` (half-pixel
    centres; also a down-sampling without antialias): ``src = max((dst + 0.5) * n_in / n_out - 0.5, 0)``.
    Then ``i0 = floor(src)``, ``i1 = min(i0 + 1, n_in - 1)``, weight of ``i1`` = ``src - i0``.
    """
    if align_corners:
        scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        src = torch.arange(n_out, device=device, dtype=torch.float32) * torch.tensor(scale, dtype=torch.float32)
    else:
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        src = ((torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    lam = (src - i0.float()).to(dtype)
    return i0, i1, lam


class UpsampleGrid:
    """Bilinear ``h x w -> H x W`` resampling (``align_corners=True`` unless told) as linear algebra.

    Args:
        feature_size: ``(h, w)`` of the encoder features.
        image_size: ``(H, W)`` of the masks / images.
        align_corners: the ``F.interpolate`` flag it mirrors (QAMP: True; SSL-ALPNet: False, where
            ``H x W`` may also be smaller than ``h x w``).
    """

    def __init__(self, feature_size: tuple[int, int], image_size: tuple[int, int],
                 device: torch.device, dtype: torch.dtype = torch.float32, align_corners: bool = True):
        (self.h, self.w), (self.H, self.W) = feature_size, image_size
        self.align_corners = align_corners
        self.y0, self.y1, self.ly = _linear_weights(self.h, self.H, device, dtype, align_corners)
        self.x0, self.x1, self.lx = _linear_weights(self.w, self.W, device, dtype, align_corners)
        self.Uy = self._matrix(self.y0, self.y1, self.ly, self.h)  # (H, h)
        self.Ux = self._matrix(self.x0, self.x1, self.lx, self.w)  # (W, w)

    @staticmethod
    def _matrix(i0: torch.Tensor, i1: torch.Tensor, lam: torch.Tensor, n_in: int) -> torch.Tensor:
        m = torch.zeros(len(i0), n_in, device=lam.device, dtype=lam.dtype)
        rows = torch.arange(len(i0), device=lam.device)
        m.index_put_((rows, i0), 1.0 - lam, accumulate=True)
        m.index_put_((rows, i1), lam, accumulate=True)
        return m

    def up(self, x: torch.Tensor) -> torch.Tensor:
        """``N x C x h x w -> N x C x H x W`` (``F.interpolate``, bilinear, this grid's align_corners).

        On the CPU ``F.interpolate`` itself; elsewhere :meth:`up_matmul` (deterministic backward).
        """
        if torch_kernels(x.device):
            return F.interpolate(x, size=(self.H, self.W), mode="bilinear", align_corners=self.align_corners)
        return self.up_matmul(x)

    def up_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`up` as ``Uy @ x @ Ux^T``: matrix products, whose backward is matrix products too
        (deterministic on CUDA), equal to ``F.interpolate`` up to float rounding."""
        return self.Uy @ x @ self.Ux.T  # (H, h) @ (N, C, h, w) @ (w, W) -> (N, C, H, W)

    def adjoint(self, a: torch.Tensor) -> torch.Tensor:
        """Transpose of ``up``: ``... x H x W -> ... x h x w``, ``<up(F), A> = <F, adjoint(A)>``."""
        return self.Uy.T @ a @ self.Ux  # (..., h, w)

    def columns(self, feats: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Columns of ``up(feats)`` at flat ``H x W`` positions, from their 4 bilinear corners.

        Args:
            feats: ``C x h x w``.
            positions: int64 ``(n,)`` in ``[0, H*W)``.

        Returns:
            ``n x C``, equal to ``up(feats[None])[0].flatten(1)[:, positions].T``.
        """
        Y, X = positions // self.W, positions % self.W
        y0, y1, ly = self.y0[Y], self.y1[Y], self.ly[Y]
        x0, x1, lx = self.x0[X], self.x1[X], self.lx[X]
        top = feats[:, y0, x0] * (1 - lx) + feats[:, y0, x1] * lx  # (C, n)
        bottom = feats[:, y1, x0] * (1 - lx) + feats[:, y1, x1] * lx
        return (top * (1 - ly) + bottom * ly).T

    def scatter_columns(self, cols: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``sum_j cols[:, j] * U[positions[j]]``: the ``K x (h*w)`` weight that, applied to the
        ``h x w`` features, equals applying ``cols`` to the columns ``positions`` of ``up(F)``.

        Args:
            cols: ``K x n``; positions: int64 ``(n,)`` in ``[0, H*W)``.

        Returns:
            ``K x (h*w)``.
        """
        Y, X = positions // self.W, positions % self.W
        out = cols.new_zeros(cols.shape[0], self.h * self.w)
        for yi, wy in ((self.y0[Y], 1 - self.ly[Y]), (self.y1[Y], self.ly[Y])):
            for xi, wx in ((self.x0[X], 1 - self.lx[X]), (self.x1[X], self.lx[X])):
                out = out.index_add(1, yi * self.w + xi, cols * (wy * wx))
        return out

    def masked_average(self, feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """MAP on the upsampled map: ``sum_x up(F)(x) M(x) / (sum_x M(x) + 1e-5)``.

        Args:
            feats: ``S x C x h x w``; masks: ``S x H x W`` in ``[0, 1]``.

        Returns:
            ``S x C``.
        """
        weights = self.adjoint(masks)  # (S, h, w)
        total = torch.einsum("schw,shw->sc", feats, weights)
        return total / (masks.sum(dim=(-2, -1))[:, None] + MAP_EPS)
