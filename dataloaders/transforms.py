"""Training augmentations: gamma, affine + elastic applied jointly to an image and its mask, and
GIN random-network intensity remapping (off by default; the pre-training of `pretrain_sabs`).

Parameters default to the reference values (docs/METHOD.md §5): gamma U(0.5, 1.5); rotation
U(-5, 5) deg, shift U(-5, 5) px per axis, shear U(-5, 5) deg, isotropic scale U(0.9, 1.2); elastic
displacement = Gaussian-blurred (sigma 5 px) U(-1, 1) noise times alpha 10. Every random
transform takes an explicit ``numpy.random.Generator``; nothing draws from a global stream.

The affine and the elastic field are composed into ONE sampling map and applied with
``scipy.ndimage.map_coordinates`` (bilinear for the image, nearest for the mask), so the mask is
resampled once and stays binary. Pixels mapped from outside the slice get 0 (the z-score mean) and
background. The pixel-sized parameters (shift, elastic alpha and sigma) are the reference's on its
native grid (256 px, the authors' ``dataloaders/datasets.py`` L183-185); on slices resampled to
another size they scale with it (:meth:`AffineElastic.scaled`, factor = model side / native side),
so that the deformation is the same fraction of the slice at any ``image_size``. scipy rather than OpenCV: OpenCV's thread pool can deadlock in forked DataLoader
workers, and these routines are single-threaded and fork-safe.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage


def gamma_transform(image: np.ndarray, rng: np.random.Generator,
                    gamma_range: tuple[float, float] = (0.5, 1.5), eps: float = 1e-5) -> np.ndarray:
    """Random gamma on the intensity range of ``image`` (one gamma and one min/max for the whole array).

    ``y = r * ((x - min + eps) / r) ** gamma + min`` with ``r = max - min + eps``, gamma ~ U(gamma_range).

    Args:
        image: float array of any shape (e.g. S x H x W z-scored slices).
        rng: the episode's generator.
    Returns:
        float32 array of the same shape, values within ``[min, max + eps]`` of the input.
    """
    gamma = rng.uniform(*gamma_range)
    cmin = float(image.min())
    irange = float(image.max()) - cmin + eps
    out = (image - cmin + eps) / irange
    np.power(out, gamma, out=out)
    out *= irange
    out += cmin
    return out.astype(np.float32, copy=False)


def random_affine_matrix(rng: np.random.Generator, shape: tuple[int, int], rotate: float = 5.0,
                         shift: float = 5.0, shear: float = 5.0,
                         scale: tuple[float, float] = (0.9, 1.2)) -> np.ndarray:
    """A random 2 x 3 forward affine (input pixel (x, y) -> output pixel) about the slice centre.

    Draw order: rotation U(-rotate, rotate) deg, shift x and y U(-shift, shift) px, shear
    U(-shear, shear) deg, isotropic scale U(*scale). Composition (applied right to left):
    ``scale . shear . shift . rotation``, as the reference, except that shear acts about the slice
    centre (the reference shears about the corner, adding up to ~22 px of extra shift at 256 px).
    """
    h, w = shape
    centre = np.array([[1, 0, (w - 1) / 2], [0, 1, (h - 1) / 2], [0, 0, 1]])
    uncentre = np.array([[1, 0, -(w - 1) / 2], [0, 1, -(h - 1) / 2], [0, 0, 1]])
    theta = np.deg2rad(rng.uniform(-rotate, rotate))
    tx, ty = rng.uniform(-shift, shift), rng.uniform(-shift, shift)
    phi = np.deg2rad(rng.uniform(-shear, shear))
    zoom = rng.uniform(*scale)
    # cv2.getRotationMatrix2D convention: positive angle = counter-clockwise in image coordinates
    rot = np.array([[np.cos(theta), np.sin(theta), 0], [-np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    translate = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    shear_m = np.array([[1, -np.sin(phi), 0], [0, np.cos(phi), 0], [0, 0, 1]])
    zoom_m = np.diag([zoom, zoom, 1.0])
    # rotation, shear and zoom about the centre; the shift is a plain translation
    matrix = (centre @ zoom_m @ shear_m @ uncentre) @ translate @ (centre @ rot @ uncentre)
    return matrix[:2]


def random_elastic_field(rng: np.random.Generator, shape: tuple[int, int], alpha: float = 10.0,
                         sigma: float = 5.0) -> np.ndarray:
    """Elastic displacement field (Simard et al. 2003), 2 x H x W float32 (dx, dy) in pixels.

    Each component is U(-1, 1) noise blurred by a Gaussian of std ``sigma`` (kernel radius
    ``int(4*sigma) // 2`` with mirrored borders, as the reference's OpenCV blur) and scaled by ``alpha``.
    """
    radius = (int(4 * sigma) | 1) // 2
    noise = rng.uniform(-1.0, 1.0, size=(2, *shape)).astype(np.float32)
    field = np.stack([ndimage.gaussian_filter(n, sigma, mode="mirror", radius=radius) for n in noise])
    field *= alpha
    return field


def warp_pair(image: np.ndarray, mask: np.ndarray, matrix: np.ndarray,
              field: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``affine`` then ``elastic`` as one resampling: ``out(p) = in(A^-1 (p + d(p)))``.

    Args:
        image: float32 H x W.
        mask: H x W integer/binary mask (nearest-neighbour resampling).
        matrix: 2 x 3 forward affine in (x, y) = (column, row) pixel coordinates
            (see :func:`random_affine_matrix`).
        field: optional 2 x H x W displacement (dx, dy) from :func:`random_elastic_field`.
    Returns:
        ``(image float32 H x W, mask of mask's dtype H x W)``.
    """
    h, w = image.shape
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(full)[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    if field is not None:
        xs = xs + field[0]
        ys = ys + field[1]
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    coords = np.stack([src_y, src_x])  # (2, H, W) in (row, column) order
    out_image = ndimage.map_coordinates(image.astype(np.float32, copy=False), coords, order=1,
                                        mode="constant", cval=0.0)
    out_mask = ndimage.map_coordinates(mask, coords, order=0, mode="constant", cval=0)
    return out_image.astype(np.float32, copy=False), out_mask.astype(mask.dtype, copy=False)


@dataclass(frozen=True)
class AffineElastic:
    """Random affine + elastic deformation applied jointly to a slice and its mask (reference values).

    ``shift``, ``alpha`` and ``sigma`` are lengths in pixels of the native grid (the authors':
    QAMP ``dataloaders/datasets.py`` L183-185, 256 px slices); rotation, shear (degrees) and scale
    (a factor) have no size. ``scaled(f)`` gives the transform for slices resampled by ``f``.
    """

    rotate: float = 5.0
    shift: float = 5.0
    shear: float = 5.0
    scale: tuple[float, float] = (0.9, 1.2)
    alpha: float = 10.0
    sigma: float = 5.0

    def __call__(self, image: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """image float32 H x W, mask H x W -> deformed (image, mask); draws affine then field from ``rng``."""
        shape = image.shape
        matrix = random_affine_matrix(rng, shape, self.rotate, self.shift, self.shear, self.scale)
        field = random_elastic_field(rng, shape, self.alpha, self.sigma) if self.alpha > 0 else None
        return warp_pair(image, mask, matrix, field)

    def scaled(self, factor: float) -> "AffineElastic":
        """The same deformation relative to the slice on a grid ``factor`` x the native side:
        ``shift``, ``alpha`` and ``sigma`` times ``factor`` (``factor == 1`` returns ``self``, the
        reference's numbers exactly). E.g. 256 -> 64 px: shift 1.25 px, alpha 2.5, sigma 1.25 px."""
        if not factor > 0:
            raise ValueError(f"AffineElastic.scaled: expected a factor > 0, got {factor}")
        if factor == 1.0:
            return self
        return replace(self, shift=self.shift * factor, alpha=self.alpha * factor, sigma=self.sigma * factor)


# GIN, "global intensity non-linear" augmentation (Ouyang et al., IEEE TMI 2022, the SSL-ALPNet author's
# cross-modality work; cheng-01037/Causality-Medical-Image-Domain-Generalization at d4d5056,
# models/imagefilter.py L8-97, configs_exp.py L85-89): a freshly drawn random conv net remaps the intensities,
# so texture and contrast change while shapes stay. Its numbers: 4 layers, 2 intermediate channels, each
# layer's kernel side drawn from {1, 3}, weights and biases N(0, 1), leaky ReLU (slope 0.01) after every
# layer but the last, the output blended with the input by alpha ~ U(0, 1) and rescaled to the input's
# Frobenius norm. Their input is the 3-channel image; ours is the one z-scored slice, so the first layer has
# one input channel (the 3 identical channels of the reference would only scale its weights).
GIN_LAYERS = 4
GIN_CHANNELS = 2
GIN_KERNELS = (1, 3)
GIN_OUT_CHANNELS = 3


def _random_conv(x: np.ndarray, out_channels: int, rng: np.random.Generator, activate: bool) -> np.ndarray:
    """One GIN layer on ``x`` (C_in x H x W): a random k x k conv (k from GIN_KERNELS, zero padding,
    stride 1), a random bias, leaky ReLU when ``activate``. Draws k, then weights, then biases."""
    k = GIN_KERNELS[int(rng.integers(len(GIN_KERNELS)))]
    weight = rng.standard_normal((out_channels, x.shape[0], k, k)).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    out = np.empty((out_channels, *x.shape[1:]), dtype=np.float32)
    for o in range(out_channels):
        acc = np.full(x.shape[1:], bias[o], dtype=np.float32)
        for i in range(x.shape[0]):
            acc += ndimage.correlate(x[i], weight[o, i], mode="constant", cval=0.0)
        out[o] = acc
    if activate:
        np.maximum(out, 0.01 * out, out=out)
    return out


def gin_transform(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """GIN on one slice: ``image`` float32 H x W (z-scored) -> float32 3 x H x W, a fresh random network.

    ``mixed = alpha * net(image) + (1 - alpha) * image`` (the image repeated to 3 channels), scaled so
    that its Frobenius norm equals the 3-channel image's. Draws, in order: every layer (kernel side,
    weights, biases; :func:`_random_conv`), then alpha. The three output channels differ.
    """
    x = image.astype(np.float32, copy=False)[None]
    h = x
    for layer in range(GIN_LAYERS):
        last = layer == GIN_LAYERS - 1
        h = _random_conv(h, GIN_OUT_CHANNELS if last else GIN_CHANNELS, rng, activate=not last)
    alpha = np.float32(rng.uniform())
    inputs = np.broadcast_to(x, h.shape)
    mixed = alpha * h + (1 - alpha) * inputs
    scale = np.linalg.norm(inputs) / (np.linalg.norm(mixed) + 1e-5)
    return (mixed * scale).astype(np.float32, copy=False)
