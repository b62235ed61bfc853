"""PANet (Wang et al., ICCV 2019) on this project's encoder (``model='panet'``).

The common ancestor of every head in ``models/``: one prototype per class, the masked average of
the support features, and a cosine classifier. The numbers are those of the authors' code,
github.com/kaixin96/PANet at 1695bf3: ``models/fewshot.py`` (``FewShotSeg``), ``train.py`` and
``config.py``; each constant names its line. Only the encoder is this project's. PANet has no
parameter of its own, so training it trains the encoder alone; this project uses it as the
neutral pre-training objective of the shared encoder (named config ``pretrain_sabs``,
docs/CPU_BUDGET.md) and as a baseline row.

* prototypes: support features up-sampled to the mask size (bilinear, ``align_corners=False``:
  ``getFeatures`` L123 calls ``F.interpolate`` without it), masked average with ``+1e-5`` in the
  denominator (L124-125) of the foreground mask and of the background ``1 - mask``, shot mean
  (``getPrototype`` L140-141);
* logits ``[bg, fg]``: ``20 cos(F(x), p)`` at feature resolution (``calDist`` L101-112), up-sampled
  to ``H x W`` (bilinear, ``align_corners=False``, L88);
* losses (``out['loss']`` = query + align, train.py L102, ``align_loss_scaler`` 1, config.py L40):
  ``query``: cross-entropy of the up-sampled logits, label 255 ignored, no class weights
  (train.py ``CrossEntropyLoss(ignore_index=255)``); ``align``: the query's argmax mask at feature
  resolution gives query prototypes (masked average of the query features at that resolution,
  L164-169) that segment each support shot, cross-entropy of the up-sampled logits against the
  support mask (fg 1, bg 0, L185-191), averaged over shots; skipped when no query cell is
  predicted foreground (``skip_ways``, L166).

The masked average of up-sampled features is computed as the features against the up-sampling's
adjoint applied to the mask (``UpsampleGrid.masked_average``): equal up to float rounding, without
forming the ``C x H x W`` map, and deterministic on CUDA. Draws nothing.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.alpnet import resample
from models.encoder import Encoder
from models.losses import cross_entropy, support_labels
from models.qamp import ModelConfig, SupportState, check_episode, check_image_size
from models.sampling import UpsampleGrid

SCALER = 20.0  # fewshot.py L101 (calDist scaler=20)
MAP_EPS = 1e-5  # fewshot.py L125 (support) and L169 (query)
LOSS_WEIGHTS = {"query": 1.0, "align": 1.0}  # train.py L102; config.py L40 align_loss_scaler = 1


def support_prototypes(feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``[bg, fg]`` prototypes, ``2 x C``, from ``S x C x h x w`` features and ``S x H x W`` masks in
    {0, 1}: masked averages of the up-sampled features (``align_corners=False``), shot mean."""
    grid = UpsampleGrid(tuple(feats.shape[-2:]), tuple(masks.shape[-2:]), feats.device, feats.dtype,
                        align_corners=False)
    fg = grid.masked_average(feats, masks)  # (S, C)
    bg = grid.masked_average(feats, 1 - masks)
    return torch.stack([bg.mean(dim=0), fg.mean(dim=0)])


def class_logits(feats: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``N x 2 x h x w`` logits ``20 cos(F(x), p_k)`` of ``N x C x h x w`` features, ``2 x C`` prototypes."""
    return SCALER * F.cosine_similarity(feats[:, None], prototypes[None, :, :, None, None], dim=2)


def alignment_loss(query_feats: torch.Tensor, query_logits: torch.Tensor, supp_feats: torch.Tensor,
                   supp_masks: torch.Tensor) -> torch.Tensor:
    """PANet's prototype alignment (``alignLoss``, fewshot.py L145-192).

    Args:
        query_feats: ``1 x C x h x w``; query_logits: ``1 x 2 x h x w`` (feature resolution).
        supp_feats: ``S x C x h x w``; supp_masks: ``S x H x W`` in {0, 1}.

    Returns:
        Cross-entropy per shot, averaged over shots; zero when no query cell is foreground.
    """
    pred = query_logits.argmax(dim=1)  # (1, h, w)
    masks = torch.stack([pred == 0, pred == 1], dim=1).to(query_feats.dtype)  # (1, 2, h, w)
    if not bool(masks[:, 1].any()):
        return query_feats.new_zeros(())
    prototypes = torch.einsum("nchw,nkhw->kc", query_feats, masks) / (masks.sum(dim=(0, 2, 3))[:, None] + MAP_EPS)
    logits = resample(class_logits(supp_feats, prototypes), tuple(supp_masks.shape[-2:]))  # (S, 2, H, W)
    labels = support_labels(supp_masks)
    n_shots = supp_feats.shape[0]
    return sum(cross_entropy(logits[s:s + 1], labels[s:s + 1]) for s in range(n_shots)) / n_shots


class PANet(nn.Module):
    """PANet with ``models.qamp.QAMP``'s call signatures; draws nothing (``generator`` accepted, unused).

    Reads ``backbone`` and ``feature_dim`` from ``config``. The encoder's threshold head and layer4
    are not computed (``Encoder.forward(x, threshold=False)``). ``SupportState.prototype`` holds
    the ``2 x C`` ``[bg, fg]`` prototypes.

    Args:
        config: ``ModelConfig`` (encoder keys).
        image_size: ``(H, W)`` of the images.
    """

    def __init__(self, config: ModelConfig, image_size: tuple[int, int]):
        super().__init__()
        self.config = config
        self.image_size = tuple(image_size)
        self.encoder = Encoder(config.backbone, config.feature_dim)

    def forward(self, supp_imgs: torch.Tensor, supp_masks: torch.Tensor, qry_imgs: torch.Tensor,
                qry_labels: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        """One episode (``1 x S x 3 x H x W``, ``1 x S x H x W``, ``1 x 3 x H x W``, labels ``1 x H x W``).

        Returns:
            ``pred`` ``1 x 2 x H x W`` softmax of ``logits``; with labels ``losses`` (unweighted
            'query', 'align') and ``loss``; ``monitors`` empty.
        """
        check_episode(supp_imgs, qry_imgs, self.image_size)
        n_shots = supp_imgs.shape[1]
        feats, _ = self.encoder(torch.cat([supp_imgs[0], qry_imgs]), threshold=False)
        masks = supp_masks[0].to(feats.dtype)
        prototypes = support_prototypes(feats[:n_shots], masks)
        low = class_logits(feats[n_shots:], prototypes)
        logits = resample(low, self.image_size)
        result: dict[str, Any] = {"pred": torch.softmax(logits, dim=1), "logits": logits, "monitors": {}}
        if qry_labels is not None:
            losses = {"query": cross_entropy(logits, qry_labels),
                      "align": alignment_loss(feats[n_shots:], low, feats[:n_shots], masks)}
            result["losses"] = losses
            result["loss"] = sum(LOSS_WEIGHTS[k] * v for k, v in losses.items())
        return result

    def encode_support(self, supp_imgs: torch.Tensor, supp_masks: torch.Tensor,
                       generator: Optional[torch.Generator] = None,
                       feats: Optional[torch.Tensor] = None) -> SupportState:
        """The ``[bg, fg]`` prototypes of a support (``1 x S x 3 x H x W``); ``feats`` as in ``QAMP.encode_support``."""
        check_image_size(supp_imgs, self.image_size, "supp_imgs")
        if feats is None:
            feats, _ = self.encoder(supp_imgs[0], threshold=False)
        masks = supp_masks[0].to(feats.dtype)
        return SupportState(feats, masks, support_prototypes(feats, masks))

    def segment(self, state: SupportState, qry_imgs: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """``N x 3 x H x W`` query slices -> ``pred`` (softmax) and ``logits``, ``N x 2 x H x W``."""
        check_image_size(qry_imgs, self.image_size, "qry_imgs")
        feats, _ = self.encoder(qry_imgs, threshold=False)
        logits = resample(class_logits(feats, state.prototype), self.image_size)
        return {"pred": torch.softmax(logits, dim=1), "logits": logits}
