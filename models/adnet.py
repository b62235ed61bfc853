"""ADNet head (Hansen et al., MedIA 2022) on this project's encoder (``model='adnet'``).

The numbers are those of the authors' code, github.com/sha168/ADNet: the head in
``models/fewshot_anom.py`` (``FewShotSeg``), the losses and their weights in ``main_train.py``; each
constant below names the line it comes from. Only the encoder is this project's (``Encoder``:
layer3 features, see docs/DIFFERENCES.md).

Prediction, for one foreground prototype ``p`` and ONE learned threshold ``T``:

* ``p``: masked average of the support features up-sampled to the mask size (bilinear,
  ``align_corners=False``: their ``getFeatures`` calls ``F.interpolate`` without the argument),
  averaged over shots;
* anomaly score ``S(x) = -20 cos(F_q(x), p)`` at feature resolution;
* ``p_fg(x) = 1 - sigmoid(0.5 (S(x) - T))``, up-sampled to ``H x W`` (bilinear,
  ``align_corners=True``, i.e. ``UpsampleGrid.up``). ``T`` is one ``nn.Parameter`` (init -10)
  shared by every image and episode.

Losses (``out['losses']``, unweighted; ``out['loss']`` = query + align + threshold):

* ``query``: NLL of ``log(clamp(pred, eps, 1 - eps))``, class weights [0.1, 1.0], label 255 ignored;
* ``align``: the query, masked by its predicted foreground *at feature resolution*, gives a
  prototype (masked average of the query features, no up-sampling) that segments each support
  shot with the same ``T``; unweighted NLL against the support mask, averaged over shots; zero
  when no query feature cell is predicted foreground (their ``skip_ways``);
* ``threshold``: ``T / 20`` (their ``t_loss``; ``t_loss_scaler`` 1), which pushes ``T`` down.

The encoder's per-image threshold head (``reduce1d`` on ``fc(avgpool(layer4))``) is not used here,
so it is not computed (``Encoder.forward(x, threshold=False)``: the encoder stops after layer3 and
``reduce1``): those parameters (and layer4, fc, reduce2) get no gradient (``grad`` stays None), which
``torch.optim.SGD`` skips, weight decay included, and layer4's batch-norm statistics keep their values.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from models.encoder import Encoder
from models.losses import nll_loss, support_labels
from models.qamp import ModelConfig, SupportState, check_episode, check_image_size
from models.qpg import query_prior
from models.sampling import UpsampleGrid

SCALER = 20.0  # cosine scale: fewshot_anom.py L17 (self.scaler = 20.0); also divides T in the threshold loss (L72)
SLOPE = 0.5  # sigmoid slope: fewshot_anom.py L183 (1.0 - torch.sigmoid(0.5 * (s - t)))
THRESHOLD_INIT = -10.0  # fewshot_anom.py L16 (self.t = Parameter(torch.Tensor([-10.0])))
MAP_EPS = 1e-5  # masked-average denominator guard: fewshot_anom.py L121 (support) and L151 (query)
QUERY_WEIGHTS = (0.1, 1.0)  # NLL class weights [bg, fg]: main_train.py L41 (--bg_wt 0.1) and L75-76
LOSS_WEIGHTS = {"query": 1.0, "align": 1.0, "threshold": 1.0}  # main_train.py L146; t_loss_scaler 1.0 (L42, L91)


def support_prototype(feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The foreground prototype: masked average of the up-sampled support features, shot mean.

    Args:
        feats: ``S x C x h x w`` support features.
        masks: ``S x H x W`` support masks in [0, 1].

    Returns:
        ``C``: ``mean_s sum_x up(F_s)(x) M_s(x) / (sum_x M_s(x) + 1e-5)``, ``up`` bilinear with
        ``align_corners=False`` (fewshot_anom.py L117-121, shot mean L137).
    """
    # sum_x up(F)(x) M(x) as F against the up-sampling's adjoint of M: equal up to rounding, without the
    # S x C x H x W map, and deterministic on CUDA (F.interpolate's backward is not)
    grid = UpsampleGrid(tuple(feats.shape[-2:]), tuple(masks.shape[-2:]), feats.device, feats.dtype,
                        align_corners=False)
    return grid.masked_average(feats, masks).mean(dim=0)


def foreground_probability(feats: torch.Tensor, prototype: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``1 - sigmoid(0.5 (-20 cos(F(x), p) - T))`` at feature resolution.

    Args:
        feats: ``N x C x h x w``; prototype: ``C`` or ``N x C``; threshold: ``T``, shape ``(1,)``.

    Returns:
        ``N x h x w`` in [0, 1].
    """
    return query_prior(feats, prototype, threshold.expand(feats.shape[0]), SCALER, SLOPE)


def alignment_loss(query_feats: torch.Tensor, query_fg: torch.Tensor, supp_feats: torch.Tensor,
                   supp_masks: torch.Tensor, threshold: torch.Tensor, grid: UpsampleGrid) -> torch.Tensor:
    """ADNet's alignment loss (fewshot_anom.py ``alignLoss``, L142-177): the query segments the support.

    The query mask is the argmax of ``[1 - p_fg, p_fg]`` at feature resolution (ties go to the
    background); its prototype is the masked average of the query features at that resolution.

    Args:
        query_feats: ``1 x C x h x w``; query_fg: ``1 x h x w`` foreground probability.
        supp_feats: ``S x C x h x w``; supp_masks: ``S x H x W`` in {0, 1}.
        threshold: ``T``, shape ``(1,)``; grid: up-sampling ``h x w -> H x W``.

    Returns:
        Unweighted NLL over each shot, averaged over shots; zero when no query cell is foreground.
    """
    fg = (torch.stack([1 - query_fg, query_fg], dim=1).argmax(dim=1) == 1).to(query_feats.dtype)  # (1, h, w)
    if not bool(fg.any()):
        return query_feats.new_zeros(())  # skip_ways (L148, L156)
    prototype = torch.einsum("nchw,nhw->c", query_feats, fg) / (fg.sum() + MAP_EPS)  # (C,) L150-151
    n_shots = supp_feats.shape[0]
    prob = grid.up(foreground_probability(supp_feats, prototype, threshold)[:, None])  # (S, 1, H, W) L163-164
    probs = torch.cat([1 - prob, prob], dim=1)
    labels = support_labels(supp_masks)
    return sum(nll_loss(probs[s:s + 1], labels[s:s + 1]) for s in range(n_shots)) / n_shots  # L175


class ADNet(nn.Module):
    """ADNet with ``models.qamp.QAMP``'s call signatures; draws nothing (``generator`` is accepted, unused).

    Reads ``backbone`` and ``feature_dim`` from ``config``; every other number is the authors'
    (constants above), so QAMP's keys (``cos_scaler``, ``query_loss_weights``, ...) do not apply.

    Args:
        config: ``ModelConfig`` (encoder keys).
        image_size: ``(H, W)`` of the images.
    """

    def __init__(self, config: ModelConfig, image_size: tuple[int, int]):
        super().__init__()
        self.config = config
        self.image_size = tuple(image_size)
        self.encoder = Encoder(config.backbone, config.feature_dim)
        self.threshold = nn.Parameter(torch.tensor([THRESHOLD_INIT]))  # (1,): T of every image and episode

    def _grid(self, feats: torch.Tensor) -> UpsampleGrid:
        return UpsampleGrid(tuple(feats.shape[-2:]), self.image_size, feats.device, feats.dtype)

    def _predict(self, state: SupportState, feats: torch.Tensor, grid: UpsampleGrid) -> dict[str, torch.Tensor]:
        """``N x C x h x w`` query features -> ``pred``, ``prior`` and ``fg`` (``N x h x w``, feature resolution)."""
        fg = foreground_probability(feats, state.prototype, self.threshold)  # (N, h, w)
        prob = grid.up(fg[:, None])[:, 0]  # (N, H, W) fewshot_anom.py L77
        return {"pred": torch.stack([1 - prob, prob], dim=1), "prior": prob, "fg": fg}

    def forward(self, supp_imgs: torch.Tensor, supp_masks: torch.Tensor, qry_imgs: torch.Tensor,
                qry_labels: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        """One episode.

        Args:
            supp_imgs: ``1 x S x 3 x H x W``; supp_masks: ``1 x S x H x W`` in {0, 1};
            qry_imgs: ``1 x 3 x H x W``; qry_labels: ``1 x H x W`` int64 in {0, 1} (255 ignored) or None.

        Returns:
            ``pred`` ``1 x 2 x H x W`` probabilities [bg, fg]; ``prior`` ``1 x H x W`` the foreground
            probability (``pred[:, 1]``); ``monitors`` ``{"threshold": T}`` (0-dim, detached); with
            labels also ``losses`` (unweighted 'query', 'align', 'threshold') and ``loss``.
        """
        check_episode(supp_imgs, qry_imgs, self.image_size)
        n_shots = supp_imgs.shape[1]
        feats, _ = self.encoder(torch.cat([supp_imgs[0], qry_imgs]), threshold=False)  # no layer4 / threshold head
        grid = self._grid(feats)
        masks = supp_masks[0].to(feats.dtype)
        state = SupportState(feats[:n_shots], masks, support_prototype(feats[:n_shots], masks))
        out = self._predict(state, feats[n_shots:], grid)
        result: dict[str, Any] = {"pred": out["pred"], "prior": out["prior"],
                                  "monitors": {"threshold": self.threshold.detach()[0]}}
        if qry_labels is not None:
            losses = {"query": nll_loss(out["pred"], qry_labels, QUERY_WEIGHTS),
                      "align": alignment_loss(feats[n_shots:], out["fg"], state.feats, masks, self.threshold, grid),
                      "threshold": self.threshold[0] / SCALER}  # fewshot_anom.py L72
            result["losses"] = losses
            result["loss"] = sum(LOSS_WEIGHTS[k] * v for k, v in losses.items())
        return result

    def encode_support(self, supp_imgs: torch.Tensor, supp_masks: torch.Tensor,
                       generator: Optional[torch.Generator] = None,
                       feats: Optional[torch.Tensor] = None) -> SupportState:
        """Support features and prototype (``1 x S x 3 x H x W``); ``feats`` as in ``QAMP.encode_support``."""
        check_image_size(supp_imgs, self.image_size, "supp_imgs")
        if feats is None:
            feats, _ = self.encoder(supp_imgs[0], threshold=False)
        masks = supp_masks[0].to(feats.dtype)
        return SupportState(feats, masks, support_prototype(feats, masks))

    def segment(self, state: SupportState, qry_imgs: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """``N x 3 x H x W`` query slices -> ``pred N x 2 x H x W``, ``prior N x H x W``."""
        check_image_size(qry_imgs, self.image_size, "qry_imgs")
        feats, _ = self.encoder(qry_imgs, threshold=False)
        out = self._predict(state, feats, self._grid(feats))
        return {"pred": out["pred"], "prior": out["prior"]}
