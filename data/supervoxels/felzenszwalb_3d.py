"""3D Felzenszwalb graph segmentation (the ADNet supervoxel algorithm), in plain NumPy.

This module is the readable definition of the algorithm and the test oracle for the fast Cython
kernel in ``felzenszwalb_3d_cy.pyx``, which must return the same labels bit for bit. It is slow
(a Python loop over every edge): use it on small volumes only.

The algorithm (docs/METHOD.md §8, ADNet ``felzenszwalb_3d_cy.pyx``):

1. Graph: every voxel is joined to its 26 neighbours; the 13 offsets of :data:`EDGE_CLASSES` list
   each neighbour pair once. Edges are enumerated class by class in that order and, inside a class,
   in C (raster) order of the overlapping region, exactly as the reference ``np.hstack`` does.
2. Edge cost ``sqrt(w * d**2)`` with ``d`` the intensity difference and ``w`` one of four weights
   that depend on the anisotropy ``s = z_spacing / x_spacing`` (:func:`edge_weights`).
3. Edges are sorted by cost. Equal costs are frequent (millions of ties), and their order
   changes the result. Two orders are offered (:data:`EDGE_ORDERS`):
   ``"reference"``: NumPy 1.x ``np.argsort(costs)`` (introsort), the order behind the published
   supervoxels, re-implemented here (:func:`numpy1_argsort`) so that it no longer depends on the
   NumPy build and CPU (NumPy >= 1.25 on AVX-512 CPUs sorts ties differently);
   ``"stable"``: ``np.argsort(costs, kind="stable")``, ties in enumeration order.
4. Merge pass: an edge joining components ``a`` and ``b`` merges them when
   ``cost < min(Int(a) + k / |a|, Int(b) + k / |b|)`` with ``k = scale / 255``; the merged
   component's internal cost ``Int`` becomes ``cost``. As in the reference kernel, each threshold
   is rounded to float32 before the comparison.
5. Size pass: the edges are visited again in the same order and every edge that touches a component
   smaller than ``min_size`` voxels merges its two sides.
6. Labels ``0 .. n-1`` are numbered in raster order of each component's first voxel (the order the
   reference's ``np.unique(roots, return_inverse=True)`` gives, its roots being minimum indices).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

EDGE_ORDERS = ("reference", "stable")
NUMPY1_SMALL_QUICKSORT = 15  # NumPy 1.x npysort: ranges of <= 16 elements get insertion sort

# Indices into the weight vector returned by :func:`edge_weights`.
W_INPLANE, W_Z, W_Z1, W_Z2 = 0, 1, 2, 3


class EdgeClass(NamedTuple):
    """One of the 13 neighbour offsets.

    The edge joins voxel ``p + a`` and voxel ``p + b`` for every ``p = (z, y, x)`` of the region
    ``[0, Z - max(a_z, b_z)) x [0, Y - max(a_y, b_y)) x [0, X - max(a_x, b_x))``.
    """

    name: str
    a: tuple[int, int, int]  # (dz, dy, dx) of the first voxel
    b: tuple[int, int, int]  # (dz, dy, dx) of the second voxel
    weight: int  # index into edge_weights(): W_INPLANE, W_Z, W_Z1 or W_Z2


# The reference order: cost1, 2, 3, 7, 9, 10, 11, 12, 13, 14, 15, 16, 25 of ADNet's kernel.
# Axes are the array axes (Z, Y, X). Changing this order changes the output.
EDGE_CLASSES: tuple[EdgeClass, ...] = (
    EdgeClass("y", (0, 1, 0), (0, 0, 0), W_INPLANE),
    EdgeClass("y+x", (0, 1, 1), (0, 0, 0), W_INPLANE),
    EdgeClass("x", (0, 0, 1), (0, 0, 0), W_INPLANE),
    EdgeClass("y-x", (0, 1, 0), (0, 0, 1), W_INPLANE),
    EdgeClass("z+y", (1, 1, 0), (0, 0, 0), W_Z1),
    EdgeClass("z+y+x", (1, 1, 1), (0, 0, 0), W_Z2),
    EdgeClass("z+x", (1, 0, 1), (0, 0, 0), W_Z1),
    EdgeClass("z-y", (1, 0, 0), (0, 1, 0), W_Z1),
    EdgeClass("z-y-x", (1, 0, 0), (0, 1, 1), W_Z2),
    EdgeClass("z-x", (1, 0, 0), (0, 0, 1), W_Z1),
    EdgeClass("z+y-x", (1, 1, 0), (0, 0, 1), W_Z2),
    EdgeClass("z-y+x", (1, 0, 1), (0, 1, 0), W_Z2),
    EdgeClass("z", (1, 0, 0), (0, 0, 0), W_Z),
)


def edge_weights(spacing: Sequence[float]) -> np.ndarray:
    """The four squared-distance weights of the anisotropic 26-neighbourhood.

    Args:
        spacing: voxel size ``(z, y, x)`` in array-axis order (any unit). As in the reference,
            only ``s = z / x`` matters (square in-plane pixels are assumed).

    Returns:
        float64 array ``[1, s**2, (1 + s**2) / 2, (2 + s**2) / 3]`` indexed by ``W_INPLANE``,
        ``W_Z``, ``W_Z1``, ``W_Z2``, computed with the reference's exact float64 expressions
        (they differ from the closed forms in the last bit, which can reorder near-tied edges).
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"expected spacing as 3 positive numbers (z, y, x), got {spacing.tolist()}")
    s = spacing[0] / spacing[2]
    return np.array(
        [1.0, s**2, (np.sqrt(1 + s**2) / np.sqrt(2)) ** 2, (np.sqrt(2 + s**2) / np.sqrt(3)) ** 2],
        dtype=np.float64,
    )


def check_volume(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as a C-contiguous float64 ``Z x Y x X`` array, or raise ValueError."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected a 3D volume (Z x Y x X), got shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"expected a non-empty volume, got shape {image.shape}")
    image = np.ascontiguousarray(image, dtype=np.float64)
    if not np.all(np.isfinite(image)):
        raise ValueError("expected finite intensities, got NaN or inf voxels")
    return image


def class_region(shape: tuple[int, int, int], cls: EdgeClass) -> tuple[int, int, int]:
    """Shape of the region of anchor voxels ``p`` of an edge class (may contain zeros)."""
    return tuple(max(n - max(da, db), 0) for n, da, db in zip(shape, cls.a, cls.b))


def enumerate_edges(image: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All edges in the reference enumeration order, with their costs.

    Args:
        image: float64 ``Z x Y x X`` intensities (0..255 in the supervoxel pipeline).
        weights: output of :func:`edge_weights`.

    Returns:
        ``(edges, costs)``: int64 ``E x 2`` flat voxel indices and float64 ``E`` costs
        ``sqrt(w * d**2)``, evaluated with the reference's float64 operations.
    """
    shape = image.shape
    index = np.arange(image.size, dtype=np.int64).reshape(shape)
    all_edges, all_costs = [], []
    for cls in EDGE_CLASSES:
        nz, ny, nx = class_region(shape, cls)
        sl_a = tuple(slice(d, d + n) for d, n in zip(cls.a, (nz, ny, nx)))
        sl_b = tuple(slice(d, d + n) for d, n in zip(cls.b, (nz, ny, nx)))
        diff = image[sl_a] - image[sl_b]
        all_costs.append(np.sqrt(weights[cls.weight] * np.square(diff)).ravel())
        all_edges.append(np.stack([index[sl_a].ravel(), index[sl_b].ravel()], axis=1))
    return np.concatenate(all_edges), np.concatenate(all_costs)


def _heapsort(v: list, idx: list[int], start: int, n: int) -> None:
    """NumPy 1.x's ``aheapsort_`` on ``idx[start:start + n]`` (a 1-based heap), in place."""
    def sift(i: int, n: int, item: int) -> None:
        j = 2 * i
        while j <= n:
            if j < n and v[idx[start + j - 1]] < v[idx[start + j]]:
                j += 1
            if v[item] < v[idx[start + j - 1]]:
                idx[start + i - 1] = idx[start + j - 1]
                i, j = j, 2 * j
            else:
                break
        idx[start + i - 1] = item

    for l in range(n >> 1, 0, -1):
        sift(l, n, idx[start + l - 1])
    while n > 1:
        item = idx[start + n - 1]
        idx[start + n - 1] = idx[start]
        n -= 1
        sift(1, n, item)


def _insertion_sort(v: list, idx: list[int], pl: int, pr: int) -> None:
    """Insertion sort of ``idx[pl:pr + 1]`` by ``v``, in place (NumPy's small-range finish)."""
    for i in range(pl + 1, pr + 1):
        item, j = idx[i], i
        while j > pl and v[item] < v[idx[j - 1]]:
            idx[j] = idx[j - 1]
            j -= 1
        idx[j] = item


def numpy1_argsort(values: Sequence[float]) -> np.ndarray:
    """``np.argsort(values)`` as NumPy 1.x computes it (``aquicksort_``: introsort), in Python.

    Median-of-3 quicksort that continues with the smaller part and pushes the larger one, a
    heapsort for pushed ranges deeper than ``2 * floor(log2(n))`` and insertion sort for ranges
    of at most 16 elements. Deterministic, but not stable: ties end up in an order that depends
    on the whole array. Slow (pure Python); the Cython kernel has a fast equivalent.

    Returns:
        int64 permutation that sorts ``values``.
    """
    v = list(values)
    idx = list(range(len(v)))

    def swap(i: int, j: int) -> None:
        idx[i], idx[j] = idx[j], idx[i]

    pl, pr = 0, len(v) - 1
    depth = 2 * (max(len(v), 1).bit_length() - 1)
    stack: list[tuple[int, int, int]] = []
    while True:
        if depth < 0:
            _heapsort(v, idx, pl, pr - pl + 1)
        else:
            while pr - pl > NUMPY1_SMALL_QUICKSORT:
                pm = pl + ((pr - pl) >> 1)
                if v[idx[pm]] < v[idx[pl]]:
                    swap(pm, pl)
                if v[idx[pr]] < v[idx[pm]]:
                    swap(pr, pm)
                if v[idx[pm]] < v[idx[pl]]:
                    swap(pm, pl)
                pivot = v[idx[pm]]
                pi, pj = pl, pr - 1
                swap(pm, pj)
                while True:
                    pi += 1
                    while v[idx[pi]] < pivot:
                        pi += 1
                    pj -= 1
                    while pivot < v[idx[pj]]:
                        pj -= 1
                    if pi >= pj:
                        break
                    swap(pi, pj)
                swap(pi, pr - 1)
                depth -= 1
                if pi - pl < pr - pi:  # push the larger part, continue with the smaller
                    stack.append((pi + 1, pr, depth))
                    pr = pi - 1
                else:
                    stack.append((pl, pi - 1, depth))
                    pl = pi + 1
            _insertion_sort(v, idx, pl, pr)
        if not stack:
            return np.array(idx, dtype=np.int64)
        pl, pr, depth = stack.pop()


# Straight through: the reference algorithm in one piece (edges, the merge pass, the size pass, labels),
# kept so, as the oracle the Cython kernel is tested against.
def felzenszwalb_3d(
    image: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    scale: float = 1.0,
    min_size: int = 20,
    order: str = "reference",
) -> np.ndarray:
    """Segment a volume into 3D supervoxels (slow reference implementation).

    Args:
        image: ``Z x Y x X`` intensities; the supervoxel pipeline passes them rescaled to 0..255.
        spacing: voxel size ``(z, y, x)``; sets the anisotropic edge weights.
        scale: Felzenszwalb's ``k``, used as ``scale / 255`` (higher: larger segments).
        min_size: components smaller than this many voxels are merged in the size pass.
        order: order of equal-cost edges, ``"reference"`` or ``"stable"`` (see module docstring).

    Returns:
        int32 ``Z x Y x X`` labels ``0 .. n-1``, numbered in raster order of first voxel.
    """
    image = check_volume(image)
    if min_size < 0:
        raise ValueError(f"expected min_size >= 0, got {min_size}")
    if order not in EDGE_ORDERS:
        raise ValueError(f"expected order in {EDGE_ORDERS}, got {order!r}")
    edges, costs = enumerate_edges(image, edge_weights(spacing))
    perm = numpy1_argsort(costs) if order == "reference" else np.argsort(costs, kind="stable")
    edges = edges[perm].tolist()
    costs = costs[perm].tolist()
    k = float(scale) / 255.0

    parent = list(range(image.size))
    size = [1] * image.size
    internal = [0.0] * image.size

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def join(r0: int, r1: int) -> int:
        parent[r1] = r0
        size[r0] += size[r1]
        return r0

    for (v0, v1), cost in zip(edges, costs):
        r0, r1 = find(v0), find(v1)
        if r0 == r1:
            continue
        # the reference stores each threshold in a C float: round to float32
        t0 = float(np.float32(internal[r0] + k / size[r0]))
        t1 = float(np.float32(internal[r1] + k / size[r1]))
        if cost < min(t0, t1):
            internal[join(r0, r1)] = cost

    for v0, v1 in edges:
        r0, r1 = find(v0), find(v1)
        if r0 != r1 and (size[r0] < min_size or size[r1] < min_size):
            join(r0, r1)

    roots = np.array([find(v) for v in range(image.size)], dtype=np.int64)
    _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int32)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first), dtype=np.int32)
    return rank[inverse].reshape(image.shape)
