# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Fast 3D Felzenszwalb supervoxels: the algorithm of ``felzenszwalb_3d.py``, bit for bit.

Build with ``bash scripts/setup.sh`` or ``python data/supervoxels/setup.py build_ext --inplace``.

Where the time goes and how it is saved (CHAOS: 256 x 256 x 40 voxels, 34M edges):

* Edge keys. An edge's cost only depends on its weight class (4 values) and on the pair of
  intensity levels it joins. Rescaled scans hold few distinct levels (CHAOS <= 1317, 8-bit CT 256),
  so every possible cost is tabulated once (levels x levels x 4) and ranked with ``np.unique``; an
  edge's key (the rank of its cost: equal floats, equal key) is two table look-ups. Volumes with
  more than ``MAX_LEVELS`` levels compute every cost and rank them with NumPy (same keys, slower).
* Edge order, one of :data:`EDGE_ORDERS`:
  - ``"reference"``: the order NumPy 1.x ``np.argsort(costs)`` (introsort, quicksort kind) gives
    the reference code, re-implemented here step for step on the keys, so it no longer depends on
    the NumPy build or CPU. It reproduces the published CHAOST2 supervoxels exactly. The sort is
    lazy (left part first), so the edges after the last merge are never fully sorted.
  - ``"stable"``: ``np.argsort(costs, kind="stable")``, as a counting sort on the keys.
* Merging. Union-find with path halving and union by size (which root represents a component
  does not change the partition). The merge pass stops once the cost reaches the largest possible
  threshold ``float32(max Int + k)``: no later edge can merge. The size pass stops once no
  component is smaller than ``min_size``. Both shortcuts are exact.
* Edges are packed as ``key << 32 | first_voxel << 4 | class`` in 64 bits (volumes below 2**28
  voxels), 8 bytes per edge.
"""
import numpy as np

from libc.math cimport sqrt
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t

from data.supervoxels.felzenszwalb_3d import EDGE_CLASSES, check_volume, class_region, edge_weights

# Bumped whenever the kernel's interface or output changes; the generator checks it, so a stale
# build is reported instead of silently used.
KERNEL_VERSION = 2
EDGE_ORDERS = ("reference", "stable")
# Above this many distinct intensities the level-pair cost table (levels**2 entries) gets too big
# and every edge cost is computed and ranked instead (slower, same result).
MAX_LEVELS = 2048
MAX_VOXELS = 1 << 28  # 28 bits of voxel index + 4 bits of class in the low word of an edge

cdef extern from *:
    """
    #define SV_PREFETCH(address) __builtin_prefetch((const void *)(address))
    """
    void SV_PREFETCH(const void* address) noexcept nogil

cdef int N_CLASSES = 13
cdef int PREFETCH_AHEAD = 16  # edges: union-find look-ups are cache misses, start them early
cdef enum:
    SMALL_QUICKSORT = 15  # NumPy 1.x npysort: ranges of <= 16 elements get insertion sort
    SORT_STACK = 512  # left-first introsort: pending ranges, bounded by ~3 x log2(n)


# ----------------------------------------------------------------------------- union-find

cdef inline int32_t find_root(int32_t* parent, int32_t x) noexcept nogil:
    while parent[x] != x:
        parent[x] = parent[parent[x]]  # path halving
        x = parent[x]
    return x


cdef inline int32_t join(int32_t* parent, int32_t* size, int32_t r0, int32_t r1) noexcept nogil:
    """Union by size of two roots; returns the new root."""
    if size[r0] < size[r1]:
        r0, r1 = r1, r0
    parent[r1] = r0
    size[r0] += size[r1]
    return r0


# ----------------------------------------------------------------------------- NumPy 1.x introsort

cdef inline uint64_t key_of(uint64_t item) noexcept nogil:
    return item >> 32


cdef inline void sift_down(uint64_t* a, int64_t i, int64_t n, uint64_t tmp) noexcept nogil:
    """Place ``tmp`` at 1-based slot ``i`` of the max-heap ``a[1:n+1]``, moving larger children up."""
    cdef int64_t j = i << 1
    while j <= n:
        if j < n and key_of(a[j]) < key_of(a[j + 1]):
            j += 1
        if key_of(tmp) < key_of(a[j]):
            a[i] = a[j]
            i = j
            j += j
        else:
            break
    a[i] = tmp


cdef void heapsort_range(uint64_t* v, int64_t n) noexcept nogil:
    """NumPy 1.x ``aheapsort_`` on ``v[0:n]`` (introsort's fallback), comparing keys only."""
    cdef uint64_t* a = v - 1  # 1-based indexing as in NumPy
    cdef int64_t l
    cdef uint64_t tmp
    l = n >> 1
    while l > 0:  # build the heap
        sift_down(a, l, n, a[l])
        l -= 1
    while n > 1:  # move the maximum to the end, restore the heap on the rest
        tmp = a[n]
        a[n] = a[1]
        n -= 1
        sift_down(a, 1, n, tmp)


cdef inline int64_t partition(uint64_t* v, int64_t pl, int64_t pr) noexcept nogil:
    """NumPy 1.x quicksort partition of ``v[pl:pr+1]`` (median of 3); returns the pivot slot."""
    cdef int64_t pm = pl + ((pr - pl) >> 1), pi, pj
    cdef uint64_t t, below, above
    if key_of(v[pm]) < key_of(v[pl]):
        t = v[pm]; v[pm] = v[pl]; v[pl] = t
    if key_of(v[pr]) < key_of(v[pm]):
        t = v[pr]; v[pr] = v[pm]; v[pm] = t
    if key_of(v[pm]) < key_of(v[pl]):
        t = v[pm]; v[pm] = v[pl]; v[pl] = t
    # key(x) < key(pivot)  <=>  x < below;   key(pivot) < key(x)  <=>  x > above
    below = key_of(v[pm]) << 32
    above = below | <uint64_t>0xFFFFFFFF
    pi = pl
    pj = pr - 1
    t = v[pm]; v[pm] = v[pj]; v[pj] = t
    while True:
        pi += 1
        while v[pi] < below:
            pi += 1
        pj -= 1
        while v[pj] > above:
            pj -= 1
        if pi >= pj:
            break
        t = v[pi]; v[pi] = v[pj]; v[pj] = t
    t = v[pi]; v[pi] = v[pr - 1]; v[pr - 1] = t
    return pi


cdef inline void insertion_sort(uint64_t* v, int64_t pl, int64_t pr) noexcept nogil:
    cdef int64_t i, j
    cdef uint64_t item, above
    for i in range(pl + 1, pr + 1):
        item = v[i]
        above = item | <uint64_t>0xFFFFFFFF  # key(item) < key(x)  <=>  x > above
        j = i
        while j > pl and v[j - 1] > above:
            v[j] = v[j - 1]
            j -= 1
        v[j] = item


cdef struct LazyIntrosort:
    # NumPy 1.x ``aquicksort_``, reorganised to finish the array left to right. Each range's final
    # content depends only on its own content, depth and whether its depth is checked, never on
    # when it is processed, so the result equals NumPy's. NumPy continues with the smaller part
    # (depth never checked) and pushes the larger (depth checked when popped); both flags are kept.
    uint64_t* v
    int64_t n
    int64_t done  # v[0:done] is final
    int top
    int64_t lo[SORT_STACK]
    int64_t hi[SORT_STACK]
    int depth[SORT_STACK]
    bint checked[SORT_STACK]
    bint overflow


cdef void introsort_init(LazyIntrosort* s, uint64_t* v, int64_t n) noexcept nogil:
    cdef int msb = 0
    cdef int64_t m = n
    while m > 1:
        m >>= 1
        msb += 1
    s.v = v
    s.n = n
    s.done = 0
    s.top = 0
    s.overflow = False
    if n > 0:
        s.lo[0] = 0
        s.hi[0] = n - 1
        s.depth[0] = 2 * msb
        s.checked[0] = True
        s.top = 1
    else:
        s.done = n


cdef void introsort_until(LazyIntrosort* s, int64_t m) noexcept nogil:
    """Sort until ``v[0:m]`` is final (the whole array when m >= n)."""
    cdef int64_t pl, pr, pi
    cdef int d
    cdef bint checked, left_smaller
    while s.done < m and s.top > 0:
        s.top -= 1
        pl = s.lo[s.top]
        pr = s.hi[s.top]
        d = s.depth[s.top]
        checked = s.checked[s.top]
        while True:
            if checked and d < 0:
                heapsort_range(s.v + pl, pr - pl + 1)
                break
            if pr - pl <= SMALL_QUICKSORT:
                insertion_sort(s.v, pl, pr)
                break
            pi = partition(s.v, pl, pr)
            d -= 1
            left_smaller = pi - pl < pr - pi
            if s.top == SORT_STACK:  # cannot happen (depth-limited); fail loudly, not silently
                s.overflow = True
                return
            s.lo[s.top] = pi + 1
            s.hi[s.top] = pr
            s.depth[s.top] = d
            s.checked[s.top] = left_smaller  # NumPy pushes the right part when the left is smaller
            s.top += 1
            pr = pi - 1
            checked = not left_smaller
        # v[0:pr+1] is final, and so is the pivot after it (the start of the next pending range)
        s.done = s.lo[s.top - 1] if s.top > 0 else s.n


def reference_argsort(keys, stops=()):
    """NumPy 1.x ``np.argsort(keys)`` through the lazy introsort (for tests).

    Args:
        keys: non-negative integer keys below 2**32, fewer than 2**32 of them.
        stops: prefix lengths to settle one after the other before finishing (exercises the
            lazy, left-to-right evaluation the merge pass uses).

    Returns:
        int64 permutation, equal to ``felzenszwalb_3d.numpy1_argsort(keys)``.
    """
    keys = np.asarray(keys, dtype=np.uint64)
    items = np.ascontiguousarray((keys << np.uint64(32)) | np.arange(len(keys), dtype=np.uint64))
    cdef uint64_t[::1] v = items
    cdef LazyIntrosort sorter
    cdef int64_t n = len(items), m
    introsort_init(&sorter, &v[0] if n > 0 else NULL, n)
    for m in list(stops) + [n]:
        introsort_until(&sorter, m)
        if sorter.overflow:
            raise RuntimeError("introsort stack overflow")
        if sorter.done < min(m, n):
            raise AssertionError(f"lazy introsort settled {sorter.done} < {m} items")
    return (items & np.uint64(0xFFFFFFFF)).astype(np.int64)


# ----------------------------------------------------------------------------- edge keys

def _class_geometry(shape):
    """Per class: region size (nz, ny, nx), flat offsets of both voxels, class weight index."""
    Z, Y, X = shape
    geom = np.zeros((N_CLASSES, 6), dtype=np.int64)
    for c, cls in enumerate(EDGE_CLASSES):
        region = class_region(shape, cls)
        off_a = cls.a[0] * Y * X + cls.a[1] * X + cls.a[2]
        off_b = cls.b[0] * Y * X + cls.b[1] * X + cls.b[2]
        geom[c] = (*region, off_a, off_b, cls.weight)
    return geom


cdef void _table_items(const uint16_t[::1] q, Py_ssize_t L, const int32_t[::1] dindex,
                       const int32_t[:, ::1] rank, const int64_t[:, ::1] geom,
                       Py_ssize_t Y, Py_ssize_t X, int64_t[::1] count, uint64_t[::1] out,
                       bint scatter) noexcept nogil:
    """Visit every edge in enumeration order; its key is rank[class weight, pair difference].

    scatter=False: write ``key << 32 | packed`` to out[e] and histogram the keys into count[key+1].
    scatter=True: stable counting-sort scatter, the edge goes to out[count[key]++].
    """
    cdef Py_ssize_t c, z, y, x, row, nz, ny, nx, oa, ob, g, lo, e = 0
    cdef uint64_t key
    for c in range(N_CLASSES):
        nz, ny, nx = geom[c, 0], geom[c, 1], geom[c, 2]
        oa, ob, g = geom[c, 3], geom[c, 4], geom[c, 5]
        lo = oa if oa < ob else ob
        for z in range(nz):
            for y in range(ny):
                row = z * Y * X + y * X
                for x in range(row, row + nx):
                    key = <uint64_t>rank[g, dindex[q[x + oa] * L + q[x + ob]]]
                    if scatter:
                        out[count[key]] = (key << 32) | <uint64_t>(((x + lo) << 4) | c)
                        count[key] += 1
                    else:
                        out[e] = (key << 32) | <uint64_t>(((x + lo) << 4) | c)
                        count[key + 1] += 1
                        e += 1


cdef void _costs_and_edges(const double[::1] img, const double[::1] weights,
                           const int64_t[:, ::1] geom, Py_ssize_t Y, Py_ssize_t X,
                           double[::1] costs, uint64_t[::1] packed) noexcept nogil:
    """Many-level path: every edge's cost and packed voxel pair, in enumeration order."""
    cdef Py_ssize_t c, z, y, x, row, nz, ny, nx, oa, ob, lo, e = 0
    cdef double w, d
    for c in range(N_CLASSES):
        nz, ny, nx = geom[c, 0], geom[c, 1], geom[c, 2]
        oa, ob = geom[c, 3], geom[c, 4]
        w = weights[geom[c, 5]]
        lo = oa if oa < ob else ob
        for z in range(nz):
            for y in range(ny):
                row = z * Y * X + y * X
                for x in range(row, row + nx):
                    d = img[x + oa] - img[x + ob]
                    costs[e] = sqrt(w * (d * d))  # the reference's float64 expression
                    packed[e] = <uint64_t>(((x + lo) << 4) | c)
                    e += 1


cdef Py_ssize_t _hash_levels(const double[::1] img, Py_ssize_t max_levels, uint16_t[::1] q,
                             double[::1] levels, uint64_t[::1] table_bits,
                             int32_t[::1] table_level, int table_log2) noexcept nogil:
    """Distinct intensities by open-addressing hashing of their bit patterns (no sort).

    Writes ``levels[q[v]] == img[v]`` and returns the number of levels, or -1 when there are more
    than ``max_levels``. Levels come in order of first occurrence; equal values with different
    bits (+0.0 / -0.0) become separate levels of equal value, which is harmless.
    """
    cdef Py_ssize_t v, n = img.shape[0], n_levels = 0
    cdef uint64_t bits, last_bits = 0, h, mask = (<uint64_t>1 << table_log2) - 1
    cdef int32_t slot, last_level = -1
    for v in range(n):
        bits = (<const uint64_t*>&img[v])[0]
        if last_level >= 0 and bits == last_bits:
            q[v] = <uint16_t>last_level
            continue
        h = (bits * <uint64_t>0x9E3779B97F4A7C15) >> (64 - table_log2)
        while True:
            slot = table_level[h]
            if slot < 0:
                if n_levels == max_levels:
                    return -1
                slot = <int32_t>n_levels
                table_level[h] = slot
                table_bits[h] = bits
                levels[n_levels] = img[v]
                n_levels += 1
                break
            if table_bits[h] == bits:
                break
            h = (h + 1) & mask
        q[v] = <uint16_t>slot
        last_bits = bits
        last_level = slot
    return n_levels


def intensity_levels(image, Py_ssize_t max_levels=MAX_LEVELS):
    """``(levels, q)`` with ``levels[q] == image.ravel()``, or ``None`` above ``max_levels``.

    Args:
        image: float64 C-contiguous array.
        max_levels: at most 65535.

    Returns:
        float64 levels (first-occurrence order) and uint16 per-voxel level index, or None.
    """
    if not 0 < max_levels <= 65535:
        raise ValueError(f"expected 0 < max_levels <= 65535, got {max_levels}")
    flat = image.ravel()
    table_log2 = max(int(4 * max_levels - 1).bit_length(), 4)  # load factor <= 1/4
    q = np.empty(flat.size, dtype=np.uint16)
    levels = np.empty(max_levels, dtype=np.float64)
    table_bits = np.zeros(1 << table_log2, dtype=np.uint64)
    table_level = np.full(1 << table_log2, -1, dtype=np.int32)
    n_levels = _hash_levels(flat, max_levels, q, levels, table_bits, table_level, table_log2)
    if n_levels < 0:
        return None
    return levels[:n_levels].copy(), q


def edge_items(image, spacing, str order="reference"):
    """Every edge as ``key << 32 | first_voxel << 4 | class``, and the cost of each key.

    Args:
        image: float64 ``Z x Y x X`` (C-contiguous) intensities.
        spacing: voxel size ``(z, y, x)``.
        order: ``"stable"``: items returned sorted (stable counting sort on the keys).
            ``"reference"``: items returned in enumeration order (sorted lazily while merging).

    Returns:
        ``(items, costs)``: uint64 items; float64 ``costs[key]``, strictly increasing in ``key``.
    """
    if order not in EDGE_ORDERS:
        raise ValueError(f"expected order in {EDGE_ORDERS}, got {order!r}")
    Z, Y, X = image.shape
    weights = edge_weights(spacing)
    geom = _class_geometry(image.shape)
    n_edges = int(np.prod(geom[:, :3], axis=1).sum())
    items = np.empty(n_edges, dtype=np.uint64)

    found = intensity_levels(image)
    if found is not None:
        levels, q16 = found
        L = len(levels)
        # all level pairs i > j: their |difference| as the reference computes it (image[a] - image[b])
        i, j = np.tril_indices(L, -1)
        diffs, pair_index = np.unique(np.abs(levels[i] - levels[j]), return_inverse=True)
        diffs = np.concatenate([[0.0], diffs])
        dindex = np.zeros((L, L), dtype=np.int32)  # diagonal: difference 0 at index 0
        dindex[i, j] = pair_index + 1
        dindex[j, i] = pair_index + 1
        # cost of every (weight class, difference), ranked across classes: equal floats, equal key
        table = np.sqrt(weights[:, None] * np.square(diffs)[None, :])  # (4, n_diffs)
        costs, rank = np.unique(table.ravel(), return_inverse=True)
        rank = np.ascontiguousarray(rank.reshape(table.shape), dtype=np.int32)
        dflat = dindex.ravel()
        count = np.zeros(len(costs) + 1, dtype=np.int64)
        _table_items(q16, L, dflat, rank, geom, Y, X, count, items, False)
        if order == "stable":
            pos = np.cumsum(count)[:len(costs)]  # first slot of each key
            _table_items(q16, L, dflat, rank, geom, Y, X, pos, items, True)
        return items, costs

    all_costs = np.empty(n_edges, dtype=np.float64)
    _costs_and_edges(image.ravel(), weights, geom, Y, X, all_costs, items)
    costs, keys = np.unique(all_costs, return_inverse=True)
    del all_costs
    items |= keys.astype(np.uint64) << np.uint64(32)
    del keys
    if order == "stable":
        items = items[np.argsort(items >> np.uint64(32), kind="stable")]
    return items, costs


# ----------------------------------------------------------------------------- merging

cdef struct MergeStats:
    int64_t merge_edges  # edges visited by the merge pass
    int64_t size_edges  # edges visited by the size pass
    int64_t sorted_edges  # edges whose final position the lazy sort had to settle
    bint overflow


cdef inline uint64_t item_at(LazyIntrosort* s, int64_t i, const int32_t* parent,
                            const int64_t[::1] delta) noexcept nogil:
    """The i-th edge in sorted order; also prefetches the voxels of an edge further on."""
    cdef uint64_t ahead
    cdef int32_t a
    if i + PREFETCH_AHEAD >= s.done:
        introsort_until(s, i + PREFETCH_AHEAD + 1)
    if i + PREFETCH_AHEAD < s.done:
        ahead = s.v[i + PREFETCH_AHEAD]
        a = <int32_t>((<uint32_t>ahead) >> 4)
        SV_PREFETCH(&parent[a])
        SV_PREFETCH(&parent[a + delta[ahead & 15]])
    return s.v[i]


cdef MergeStats _merge(uint64_t[::1] items_v, bint presorted, const double[::1] costs,
                       const int64_t[::1] delta, double k, int64_t min_size,
                       int32_t[::1] parent_v, int32_t[::1] size_v,
                       double[::1] internal) noexcept nogil:
    """Both passes of the algorithm on the union-find arrays (initialised by the caller)."""
    cdef int32_t* parent = &parent_v[0]
    cdef int32_t* size = &size_v[0]
    cdef Py_ssize_t n = parent_v.shape[0]
    cdef int64_t i, n_edges = items_v.shape[0]
    cdef int32_t a, b, r0, r1, r
    cdef uint64_t item
    cdef double cost, max_internal = 0.0
    cdef float t0, t1, bound
    cdef int64_t n_small = 0, s0, s1
    cdef LazyIntrosort sorter
    cdef MergeStats stats
    stats.merge_edges = 0
    stats.size_edges = 0
    stats.overflow = False
    introsort_init(&sorter, &items_v[0] if n_edges > 0 else NULL, n_edges)
    if presorted:
        sorter.done = n_edges
        sorter.top = 0

    # merge pass: cost < min(Int(a) + k/|a|, Int(b) + k/|b|), thresholds rounded to float32.
    # Every threshold is <= float32(max Int + k): once the cost reaches it, nothing merges again.
    bound = <float>(max_internal + k)
    for i in range(n_edges):
        item = item_at(&sorter, i, parent, delta)
        cost = costs[item >> 32]
        if cost >= bound:
            break
        stats.merge_edges += 1
        a = <int32_t>((<uint32_t>item) >> 4)
        b = <int32_t>(a + delta[item & 15])
        r0 = find_root(parent, a)
        r1 = find_root(parent, b)
        if r0 == r1:
            continue
        t0 = <float>(internal[r0] + k / size[r0])
        t1 = <float>(internal[r1] + k / size[r1])
        if cost < (t0 if t0 < t1 else t1):
            r = join(parent, size, r0, r1)
            internal[r] = cost
            if cost > max_internal:
                max_internal = cost
                bound = <float>(max_internal + k)

    # size pass: join every edge touching a component below min_size, until none is left
    for i in range(n):
        if parent[i] == i and size[i] < min_size:
            n_small += 1
    for i in range(n_edges):
        if n_small == 0:
            break
        stats.size_edges += 1
        item = item_at(&sorter, i, parent, delta)
        a = <int32_t>((<uint32_t>item) >> 4)
        b = <int32_t>(a + delta[item & 15])
        r0 = find_root(parent, a)
        r1 = find_root(parent, b)
        if r0 == r1:
            continue
        s0 = size[r0]
        s1 = size[r1]
        if s0 < min_size or s1 < min_size:
            join(parent, size, r0, r1)
            n_small -= (s0 < min_size) + (s1 < min_size) - (s0 + s1 < min_size)
    stats.sorted_edges = sorter.done
    stats.overflow = sorter.overflow
    return stats


cdef void _label(int32_t[::1] parent_v, int32_t[::1] root_label, int32_t[::1] out) noexcept nogil:
    """Labels 0..n-1 in raster order of each component's first voxel."""
    cdef int32_t* parent = &parent_v[0]
    cdef Py_ssize_t v, n = parent_v.shape[0]
    cdef int32_t r, next_label = 0
    for v in range(n):
        r = find_root(parent, <int32_t>v)
        if root_label[r] < 0:
            root_label[r] = next_label
            next_label += 1
        out[v] = root_label[r]


def segment_items(shape, items, costs, bint presorted, double scale=1.0,
                  Py_ssize_t min_size=20, dict stats=None):
    """Merge and size passes over edge items (see :func:`edge_items`); sorts them in place lazily
    with the reference introsort unless ``presorted``.

    Returns:
        int32 labels of ``shape`` ``(Z, Y, X)``, numbered in raster order of first voxel. When
        ``stats`` is given, it receives the number of edges each pass visited.
    """
    geom = _class_geometry(shape)
    delta = np.zeros(16, dtype=np.int64)
    delta[:N_CLASSES] = np.abs(geom[:, 3] - geom[:, 4])
    n = int(np.prod(shape))
    parent = np.arange(n, dtype=np.int32)
    size = np.ones(n, dtype=np.int32)
    internal = np.zeros(n, dtype=np.float64)
    cdef MergeStats result
    cdef uint64_t[::1] items_v = items
    cdef const double[::1] costs_v = costs
    cdef const int64_t[::1] delta_v = delta
    cdef int32_t[::1] parent_v = parent, size_v = size
    cdef double[::1] internal_v = internal
    cdef double k = scale / 255.0
    with nogil:
        result = _merge(items_v, presorted, costs_v, delta_v, k, min_size, parent_v, size_v,
                        internal_v)
    if result.overflow:
        raise RuntimeError("introsort stack overflow: please report this volume")
    del internal
    if stats is not None:
        stats.update(n_edges=len(items), merge_edges=result.merge_edges,
                     size_edges=result.size_edges, sorted_edges=result.sorted_edges)

    labels = np.empty(n, dtype=np.int32)
    root_label = np.full(n, -1, dtype=np.int32)
    _label(parent, root_label, labels)
    return labels.reshape(shape)


def felzenszwalb_3d(image, spacing=(1.0, 1.0, 1.0), double scale=1.0, Py_ssize_t min_size=20,
                    str order="reference", dict stats=None):
    """Segment a volume into 3D supervoxels (same labels as ``felzenszwalb_3d.felzenszwalb_3d``).

    Args:
        image: ``Z x Y x X`` intensities; the supervoxel pipeline passes them rescaled to 0..255.
        spacing: voxel size ``(z, y, x)``; sets the anisotropic edge weights.
        scale: Felzenszwalb's ``k``, used as ``scale / 255`` (higher: larger segments).
        min_size: components smaller than this many voxels are merged in the size pass.
        order: how edges of equal cost are ordered: ``"reference"`` (NumPy 1.x introsort, as the
            published supervoxels) or ``"stable"`` (enumeration order).
        stats: optional dict that receives edge counts (total, visited per pass, sorted).

    Returns:
        int32 ``Z x Y x X`` labels ``0 .. n-1``, numbered in raster order of first voxel.

    Runs single-threaded; memory is about 8 bytes per edge (13 per voxel) plus 20 per voxel.
    """
    image = check_volume(image)
    if min_size < 0:
        raise ValueError(f"expected min_size >= 0, got {min_size}")
    if image.size >= MAX_VOXELS:
        raise ValueError(
            f"expected fewer than {MAX_VOXELS} voxels, got {image.size} (shape {image.shape}): "
            "crop or downsample the volume"
        )
    items, costs = edge_items(image, spacing, order)
    return segment_items(image.shape, items, costs, order == "stable", scale, min_size, stats)
