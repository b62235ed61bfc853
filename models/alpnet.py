"""SSL-ALPNet (Ouyang et al., ECCV 2020) on this project's encoder (``model='alpnet'``).

The numbers are those of the authors' code, github.com/cheng-01037/Self-supervised-Fewshot-Medical-Image-Segmentation:
``models/alpmodule.py`` (``MultiProtoAsConv``, "ALP"), ``models/grid_proto_fewshot.py``
(``FewShotSeg``), ``config_ssl_upload.py``, ``training.py`` and ``validation.py``; each constant
below names the line it comes from. Only the encoder is this project's (docs/DIFFERENCES.md).

Everything happens at feature resolution ``h x w``; per class, prototypes from the support:

* the support mask is resized to ``h x w`` (bilinear, ``align_corners=False``; grid_proto_fewshot.py
  L125-126), the background mask being ``1 - mask``;
* local prototypes: features and resized mask average-pooled with a ``k x k`` window (stride ``k``,
  remainder cells dropped); a cell's pooled feature is kept when its pooled mask value is ``> 0.95``
  (strictly; alpmodule.py L83 / L119). ``k`` is a fraction of the feature side, so the windows
  cover the authors' pixels at any image size: side / 8 in training (their ``proto_grid_size`` 8:
  4 cells of their 32 x 32 features, 32 x 32 px at 256 px) and side / 16 in eval mode (their
  ``val_wsize`` 2: 16 x 16 px); on our stride-4 features 8 / 4 cells at 256 px, 2 / 1 at 64 px;
* foreground (``'gridconv+'``): the local prototypes plus each shot's global masked average, used
  when some pooled cell of window side / 8 of the resized mask reaches ``>= 0.95`` (their literal 4
  on 32 x 32 features, in both modes); otherwise (``'mask'``) only the shot mean of the global masked averages;
* background (``'gridconv'``): local prototypes only. No cell over 0.95 leaves the set empty and
  the background score zero (the authors' ``F.conv2d`` with zero filters raises there; their
  training loop skips such episodes, docs/DIFFERENCES.md).

Score of a class at query position ``x`` with prototypes ``p_j``: ``d_j = 20 cos(F(x), p_j)`` (norms
floored at 1e-4: their ``safe_norm``) combined as ``sum_j softmax(d)_j d_j``; in ``'mask'`` mode
``20 F.cosine_similarity(F(x), p, eps=1e-4)``. The maps ``[bg, fg]`` are logits, up-sampled to
``H x W`` (bilinear, ``align_corners=False``; grid_proto_fewshot.py L149).

Losses (``out['losses']``, unweighted; ``out['loss']`` = query + align, training.py L141):

* ``query``: cross-entropy of the up-sampled logits, class weights [0.05, 1.0], label 255 ignored;
* ``align``: the query, with its predicted mask (argmax of the feature-resolution logits) as
  support mask, segments each support shot by the same rules (training window); unweighted
  cross-entropy against the support mask, averaged over shots. It is not skipped when the
  predicted foreground is empty (grid_proto_fewshot.py L188-190): the foreground prototype is then
  the zero vector and its score zero.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.encoder import Encoder
from models.losses import cross_entropy, support_labels
from models.qamp import ModelConfig, SupportState, check_episode, check_image_size
from models.sampling import UpsampleGrid

SCALER = 20.0  # cosine scale: alpmodule.py L60, L87, L129
PROTO_THRESHOLD = 0.95  # pooled-mask threshold of local prototypes: grid_proto_fewshot.py L22-23 (FG/BG_THRESH)
# Pooling windows as fractions of the feature side, so that they cover the authors' pixels at any image
# size (at 256 px: 32 x 32 px in training and for the mode decision, 16 x 16 px at test):
# training: feature side / proto_grid_size 8 (config_ssl_upload.py L70-71; alpmodule.py L25 computes the
# kernel from the feature side); test: val_wsize 2 on their 32 x 32 features = side / 16 (config_ssl_upload.py
# L63, validation.py L170 isval=True); mode decision: the literal 4 on 32 x 32 features = side / 8
# (grid_proto_fewshot.py L142, L215). Floor division as alpmodule.py L25, at least one cell.
TRAIN_GRID = 8
EVAL_GRID = 16
MODE_GRID = 8


def window_cells(side: int, grid: int) -> int:
    """Pooling window (and stride) in feature cells on a feature map of ``side`` cells: ``side // grid``,
    at least 1. On our stride-4 features: 256 px -> 8 / 4 cells (32 / 16 px), 128 px -> 4 / 2, 64 px -> 2 / 1."""
    return max(1, side // grid)


NORM_EPS = 1e-4  # safe_norm floor: alpmodule.py L49; F.cosine_similarity eps of 'mask' mode: L60
MAP_EPS = 1e-5  # masked-average denominator guard: alpmodule.py L56-57, L122-123
QUERY_WEIGHTS = (0.05, 1.0)  # cross-entropy class weights [bg, fg]: util/utils.py L85-87 (use_wce=True, config L57)
LOSS_WEIGHTS = {"query": 1.0, "align": 1.0}  # training.py L141 (usealign=True, config L56)


def resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``N x C x h x w -> N x C x size`` bilinear, ``align_corners=False`` (the authors' mode, up and down):
    ``F.interpolate`` on the CPU, its matrix form elsewhere (deterministic on CUDA; ``models.sampling``)."""
    return UpsampleGrid(tuple(x.shape[-2:]), tuple(size), x.device, x.dtype, align_corners=False).up(x)


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``S x H x W`` masks -> ``S x h x w`` (bilinear, ``align_corners=False``; grid_proto_fewshot.py L125)."""
    return resample(masks[:, None], size)[:, 0]


def local_prototypes(feats: torch.Tensor, masks: torch.Tensor, window: int) -> torch.Tensor:
    """Pooled features of the ``window x window`` cells whose pooled mask is ``> 0.95``.

    Args:
        feats: ``S x C x h x w``; masks: ``S x h x w`` in [0, 1] (feature resolution).
        window: pooling window and stride in feature cells.

    Returns:
        ``P x C`` (``P`` may be 0), shot-major then raster order (alpmodule.py L75-83).

    Raises:
        ValueError: the feature map is smaller than the window.
    """
    check_window(feats, window)
    pooled = F.avg_pool2d(feats, window)  # (S, C, h/k, w/k)
    pooled_mask = F.avg_pool2d(masks[:, None], window)  # (S, 1, h/k, w/k)
    keep = pooled_mask.flatten() > PROTO_THRESHOLD  # (S * h/k * w/k,)
    return pooled.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])[keep]


def check_window(feats: torch.Tensor, window: int) -> None:
    h, w = feats.shape[-2:]
    if h < window or w < window:
        raise ValueError(f"alpnet: the {h} x {w} feature map is smaller than the {window} x {window} pooling "
                         f"window: use images of at least {4 * window} x {4 * window} px (features are H/4)")


def masked_average(feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``S x C`` masked averages at feature resolution (``S x C x h x w``, ``S x h x w``)."""
    return torch.einsum("schw,shw->sc", feats, masks) / (masks.sum(dim=(-2, -1))[:, None] + MAP_EPS)


def safe_norm(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x / max(||x||, 1e-4)`` along ``dim`` (alpmodule.py L49-53)."""
    return x / torch.clamp(torch.linalg.vector_norm(x, dim=dim, keepdim=True), min=NORM_EPS)


def prototype_scores(feats: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``sum_j softmax(d)_j d_j`` with ``d_j = 20 cos(F(x), p_j)`` (alpmodule.py L84-89, L125-131).

    Args:
        feats: ``N x C x h x w``; prototypes: ``P x C`` (``P = 0`` gives zeros).

    Returns:
        ``N x 1 x h x w``.
    """
    dists = torch.einsum("nchw,pc->nphw", safe_norm(feats), safe_norm(prototypes)) * SCALER  # (N, P, h, w)
    return torch.sum(torch.softmax(dists, dim=1) * dists, dim=1, keepdim=True)


def class_prototypes(feats: torch.Tensor, masks: torch.Tensor, window: int) -> SupportState:
    """Both classes' prototypes from features and masks at feature resolution.

    Args:
        feats: ``S x C x h x w``; masks: ``S x h x w`` foreground in [0, 1].
        window: local pooling window in cells (``window_cells`` of ``TRAIN_GRID`` or ``EVAL_GRID``).

    Returns:
        ``SupportState`` with ``prototype`` ``C`` (shot mean of the global foreground averages),
        ``fg`` ``P_fg x C`` ('gridconv+': local, then one global per shot) or None ('mask' mode:
        ``prototype`` alone), ``bg`` ``P_bg x C`` (local only, possibly empty); ``feats`` and
        ``masks`` as given (callers replace ``masks`` by the full-size ones).
    """
    mode_window = window_cells(min(feats.shape[-2:]), MODE_GRID)
    check_window(feats, mode_window)
    glob = masked_average(feats, masks)  # (S, C)
    fg = None
    if F.avg_pool2d(masks[:, None], mode_window).max() >= PROTO_THRESHOLD:  # grid_proto_fewshot.py L142
        fg = torch.cat([local_prototypes(feats, masks, window), glob])
    bg = local_prototypes(feats, 1 - masks, window)
    return SupportState(feats, masks, glob.mean(dim=0), fg, bg)


def class_logits(feats: torch.Tensor, state: SupportState) -> torch.Tensor:
    """``N x 2 x h x w`` logits [bg, fg] of ``N x C x h x w`` features."""
    if state.fg is None:  # 'mask' mode, alpmodule.py L55-60
        fg = SCALER * F.cosine_similarity(feats, state.prototype[None, :, None, None], dim=1, eps=NORM_EPS)[:, None]
    else:
        fg = prototype_scores(feats, state.fg)
    return torch.cat([prototype_scores(feats, state.bg), fg], dim=1)


def alignment_loss(query_feats: torch.Tensor, query_logits: torch.Tensor, supp_feats: torch.Tensor,
                   supp_masks: torch.Tensor) -> tuple[torch.Tensor, SupportState]:
    """ALPNet's alignment loss (grid_proto_fewshot.py ``alignLoss``, L166-230).

    Args:
        query_feats: ``1 x C x h x w``; query_logits: ``1 x 2 x h x w`` (feature resolution).
        supp_feats: ``S x C x h x w``; supp_masks: ``S x H x W`` in {0, 1}.

    Returns:
        The loss (unweighted cross-entropy per shot, averaged over shots) and the query's
        prototypes (for monitoring).
    """
    pred_fg = (query_logits.argmax(dim=1) == 1).to(query_feats.dtype)  # (1, h, w)
    state = class_prototypes(query_feats, pred_fg, window_cells(min(query_feats.shape[-2:]), TRAIN_GRID))  # alignLoss never passes isval
    n_shots = supp_feats.shape[0]
    logits = resample(class_logits(supp_feats, state), supp_masks.shape[-2:])  # (S, 2, H, W) L219
    labels = support_labels(supp_masks)
    loss = sum(cross_entropy(logits[s:s + 1], labels[s:s + 1]) for s in range(n_shots))
    return loss / n_shots, state  # L227-230


class ALPNet(nn.Module):
    """SSL-ALPNet with ``models.qamp.QAMP``'s call signatures; draws nothing (``generator`` is accepted, unused).

    Reads ``backbone`` and ``feature_dim`` from ``config``; every other number is the authors'
    (constants above). The local pooling window follows the mode: feature side / ``TRAIN_GRID`` in
    ``train()``, / ``EVAL_GRID`` in ``eval()``. The encoder's per-image threshold head is unused and
    not computed (``Encoder.forward(x, threshold=False)``: no layer4 either; those parameters get no
    gradient, which SGD skips).

    ``SupportState`` here: ``prototype`` the global foreground prototype, ``fg`` the foreground
    set (None in 'mask' mode), ``bg`` the background set (``P x C``, possibly empty).

    Args:
        config: ``ModelConfig`` (encoder keys).
        image_size: ``(H, W)`` of the images.
    """

    def __init__(self, config: ModelConfig, image_size: tuple[int, int]):
        super().__init__()
        self.config = config
        self.image_size = tuple(image_size)
        self.encoder = Encoder(config.backbone, config.feature_dim)

    def _window(self, feats: torch.Tensor) -> int:
        return window_cells(min(feats.shape[-2:]), TRAIN_GRID if self.training else EVAL_GRID)

    def _support_state(self, feats: torch.Tensor, masks: torch.Tensor) -> SupportState:
        """``S x C x h x w`` features and ``S x H x W`` masks -> prototypes (masks kept full size)."""
        state = class_prototypes(feats, resize_masks(masks, tuple(feats.shape[-2:])), self._window(feats))
        state.masks = masks
        return state

    def _logits(self, state: SupportState, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature-resolution ``N x 2 x h x w`` and up-sampled ``N x 2 x H x W`` logits."""
        low = class_logits(feats, state)
        return low, resample(low, self.image_size)

    def forward(self, supp_imgs: torch.Tensor, supp_masks: torch.Tensor, qry_imgs: torch.Tensor,
                qry_labels: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        """One episode.

        Args:
            supp_imgs: ``1 x S x 3 x H x W``; supp_masks: ``1 x S x H x W`` in {0, 1};
            qry_imgs: ``1 x 3 x H x W``; qry_labels: ``1 x H x W`` int64 in {0, 1} (255 ignored) or None.

        Returns:
            ``pred`` ``1 x 2 x H x W`` softmax of ``logits`` (same argmax); ``logits`` ``1 x 2 x H x W``;
            ``monitors``: ``fg_local_prototypes`` and ``bg_local_prototypes`` (counts of this
            episode's support; 0 foreground in 'mask' mode) and ``empty_bg_set`` (1.0 when a
            background set was empty, in the forward or, with labels, the alignment direction:
            where the authors' code raises). With labels also ``losses`` (unweighted 'query',
            'align') and ``loss``.
        """
        check_episode(supp_imgs, qry_imgs, self.image_size)
        n_shots = supp_imgs.shape[1]
        feats, _ = self.encoder(torch.cat([supp_imgs[0], qry_imgs]), threshold=False)  # no layer4 / threshold head
        state = self._support_state(feats[:n_shots], supp_masks[0].to(feats.dtype))
        low, logits = self._logits(state, feats[n_shots:])
        n_fg = 0 if state.fg is None else state.fg.shape[0] - n_shots  # minus the global ones
        empty_bg = state.bg.shape[0] == 0
        result: dict[str, Any] = {"pred": torch.softmax(logits, dim=1), "logits": logits}
        if qry_labels is not None:
            weight = torch.as_tensor(QUERY_WEIGHTS, dtype=logits.dtype, device=logits.device)
            align, reverse = alignment_loss(feats[n_shots:], low, state.feats, state.masks)
            empty_bg = empty_bg or reverse.bg.shape[0] == 0
            losses = {"query": cross_entropy(logits, qry_labels, weight=weight),
                      "align": align}
            result["losses"] = losses
            result["loss"] = sum(LOSS_WEIGHTS[k] * v for k, v in losses.items())
        result["monitors"] = {name: torch.tensor(float(value)) for name, value in
                              (("fg_local_prototypes", n_fg), ("bg_local_prototypes", state.bg.shape[0]),
                               ("empty_bg_set", empty_bg))}
        return result

    def encode_support(self, supp_imgs: torch.Tensor, supp_masks: torch.Tensor,
                       generator: Optional[torch.Generator] = None,
                       feats: Optional[torch.Tensor] = None) -> SupportState:
        """Support prototypes (``1 x S x 3 x H x W``); ``feats`` as in ``QAMP.encode_support``."""
        check_image_size(supp_imgs, self.image_size, "supp_imgs")
        if feats is None:
            feats, _ = self.encoder(supp_imgs[0], threshold=False)
        return self._support_state(feats, supp_masks[0].to(feats.dtype))

    def segment(self, state: SupportState, qry_imgs: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """``N x 3 x H x W`` query slices -> ``pred`` (softmax) and ``logits``, ``N x 2 x H x W``."""
        check_image_size(qry_imgs, self.image_size, "qry_imgs")
        feats, _ = self.encoder(qry_imgs, threshold=False)
        _, logits = self._logits(state, feats)
        return {"pred": torch.softmax(logits, dim=1), "logits": logits}
