"""In-plane resampling between a scan's native grid and the square grid the model sees (``image_size``).

The slice axis is never touched: only ``H x W`` changes. Three kinds of data, three rules:
- images: bilinear (antialiased when shrinking, so a 256 -> 64 reduction averages instead of
  skipping pixels);
- label and supervoxel maps: nearest neighbour by index, so every id is kept exactly and no new
  value appears (pixel centres are matched: output pixel ``i`` reads input pixel
  ``floor((i + 0.5) * n_in / n_out)``);
- class probabilities (predictions going back to the native grid): bilinear, then argmax, which
  gives smoother native-grid boundaries than resampling the hard mask.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def resize_image(volume: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear in-plane resize of an image stack.

    Args:
        volume: float ``Z x H x W`` (any float dtype; computed in float32).
        size: output ``S`` (square) or ``(H', W')``.
    Returns:
        float32 ``Z x H' x W'`` (the input itself, as float32, when the size already matches).
    """
    out_hw = _size2(size)
    volume = np.asarray(volume, dtype=np.float32)
    if tuple(volume.shape[-2:]) == out_hw:
        return volume
    tensor = torch.from_numpy(np.ascontiguousarray(volume))[:, None]  # (Z, 1, H, W)
    shrink = out_hw[0] < volume.shape[-2] or out_hw[1] < volume.shape[-1]
    out = F.interpolate(tensor, size=out_hw, mode="bilinear", align_corners=False, antialias=shrink)
    return out[:, 0].numpy()


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of every output pixel along one axis (pixel centres matched): int64 ``(n_out,)``."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def resize_labels(volume: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour in-plane resize of an integer map; ids are kept, none is invented.

    Args:
        volume: integer ``Z x H x W`` (labels or supervoxel ids), or ``H x W``.
        size: output ``S`` or ``(H', W')``.
    Returns:
        same dtype, ``Z x H' x W'`` (or ``H' x W'``).
    """
    out_hw = _size2(size)
    h, w = volume.shape[-2:]
    if (h, w) == out_hw:
        return volume
    rows, cols = nearest_indices(h, out_hw[0]), nearest_indices(w, out_hw[1])
    return volume[..., rows[:, None], cols[None, :]]


def resize_probabilities(prob: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of per-class maps (or a prior) back to a native grid.

    Args:
        prob: ``N x K x h x w`` (probabilities in [0, 1]) or ``N x h x w``.
        size: native ``(H, W)``.
    Returns:
        the same layout at ``H x W`` (values stay in [0, 1]: bilinear weights are convex).
    """
    size = _size2(size)
    if tuple(prob.shape[-2:]) == size:
        return prob
    squeeze = prob.dim() == 3
    x = prob[:, None] if squeeze else prob
    out = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    return out[:, 0] if squeeze else out


def pixel_ratio(native_hw: tuple[int, int], size: int | tuple[int, int]) -> float:
    """``(H' W') / (H W)``: how areas (pixel counts) scale from the native grid to the model grid."""
    out_hw = _size2(size)
    return (out_hw[0] * out_hw[1]) / float(native_hw[0] * native_hw[1])
