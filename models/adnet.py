"""ADNet baseline head on the QAMP encoder (``model='adnet'``).

The prediction is the QPG prior itself, ``cat(1 - P0, P0)`` (the prediction QAMP falls back to for
an empty support mask). Losses: weighted query NLL and ADNet's reverse alignment. ADNet's own
threshold loss (``t / 20`` on one learned scalar) has no counterpart here, because the threshold
comes from the encoder's threshold head per image.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from models.encoder import Encoder
from models.losses import nll_loss, prior_alignment_loss
from models.qamp import ModelConfig, SupportState, check_episode, check_image_size
from models.qpg import query_prior
from models.sampling import UpsampleGrid


class ADNet(nn.Module):
    """Same call signatures as ``models.qamp.QAMP``; draws nothing (the generator is accepted and unused)."""

    def __init__(self, config: ModelConfig, image_size: tuple[int, int]):
        super().__init__()
        self.config = config
        self.image_size = tuple(image_size)
        self.encoder = Encoder(config.backbone, config.feature_dim)

    def _grid(self, feats: torch.Tensor) -> UpsampleGrid:
        return UpsampleGrid(tuple(feats.shape[-2:]), self.image_size, feats.device, feats.dtype)

    def _predict(self, state: SupportState, feats: torch.Tensor, thresholds: torch.Tensor,
                 grid: UpsampleGrid) -> dict[str, torch.Tensor]:
        cfg = self.config
        prior = query_prior(feats, state.prototype, thresholds, cfg.cos_scaler, cfg.prior_temperature)
        prior = grid.up(prior[:, None])[:, 0]  # (N, H, W)
        return {"pred": torch.stack([1 - prior, prior], dim=1), "prior": prior}

    def forward(self, supp_imgs: torch.Tensor, supp_masks: torch.Tensor, qry_imgs: torch.Tensor,
                qry_labels: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        """As ``QAMP.forward``; ``losses`` holds 'query' and 'align'."""
        check_episode(supp_imgs, qry_imgs, self.image_size)
        n_shots = supp_imgs.shape[1]
        feats, thresholds = self.encoder(torch.cat([supp_imgs[0], qry_imgs]))
        grid = self._grid(feats)
        masks = supp_masks[0].to(feats.dtype)
        state = SupportState(feats[:n_shots], masks, grid.masked_average(feats[:n_shots], masks).mean(dim=0))
        out = self._predict(state, feats[n_shots:], thresholds[n_shots:], grid)
        if qry_labels is not None:
            cfg = self.config
            losses = {"query": nll_loss(out["pred"], qry_labels, cfg.query_loss_weights),
                      "align": prior_alignment_loss(feats[n_shots:], out["pred"], state.feats, masks,
                                                    thresholds[n_shots:], grid, cfg.cos_scaler, cfg.prior_temperature)}
            out["losses"] = losses
            out["loss"] = losses["query"] + cfg.align_weight * losses["align"]
        return out

    def encode_support(self, supp_imgs: torch.Tensor, supp_masks: torch.Tensor,
                       generator: Optional[torch.Generator] = None,
                       feats: Optional[torch.Tensor] = None) -> SupportState:
        """Support features and prototype (``1 x S x 3 x H x W``); ``feats`` as in ``QAMP.encode_support``."""
        check_image_size(supp_imgs, self.image_size, "supp_imgs")
        if feats is None:
            feats, _ = self.encoder(supp_imgs[0])
        masks = supp_masks[0].to(feats.dtype)
        return SupportState(feats, masks, self._grid(feats).masked_average(feats, masks).mean(dim=0))

    def segment(self, state: SupportState, qry_imgs: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        check_image_size(qry_imgs, self.image_size, "qry_imgs")
        feats, thresholds = self.encoder(qry_imgs)
        return self._predict(state, feats, thresholds, self._grid(feats))
