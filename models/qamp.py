"""QAMP: Query-Assisted Multiple Prototypes for 1-way few-shot segmentation.

Reads top to bottom: configuration -> support state (MGSP, once per support) -> prediction for
query images (QPG prior, PGQP samples, similarity decoders) -> losses (training).

Random draws (all from the caller's ``torch.Generator``, in this order):
1. ``encode_support`` (support side): for foreground then background, for each shot: the fill
   positions of the MLP map, the MLP dropout mask (training only), the kept MLP columns, the edge
   samples.
2. ``segment`` (query side): for each query slice in order, for each shot the foreground PGQP
   samples, then for each shot the background ones; then the decoders' channel-dropout masks
   (training only).
So ``segment`` over N slices equals N calls on one slice each with the same generator, and
``forward`` equals ``encode_support`` followed by ``segment`` (eval mode, up to float rounding).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from models.decoder import SimilarityDecoder, cosine_maps
from models.encoder import Encoder
from models.losses import (boundary_f1_loss, nll_loss, prior_alignment_loss, prototype_consistency_loss,
                           regroup_by_origin)
from models.mgsp import N_MAP, PrototypeMLP, band_iterations, class_support_prototypes, edge_bands, folded_weight
from models.pgqp import query_prototypes
from models.qpg import query_prior
from models.sampling import UpsampleGrid


PROTO_LOSS_SHOTS = ("mean", "sum")
EMPTY_SUPPORT_RULES = ("any", "first")
CT_PRIOR_THRESHOLDS = (0.7, 0.6)  # (tau_fg, tau_bg) of CT datasets (SABS); MR keeps the defaults
# ModelConfig fields that only choose how the same numbers are computed (equal up to rounding).
COMPUTE_ONLY_KEYS = ("fast_mlp", "decoder_winograd")


@dataclass(frozen=True)
class ModelConfig:
    """Model hyper-parameters; field names are the Sacred config keys, defaults the reference's.

    The one place of these defaults: ``config.py`` takes its model keys from ``ModelConfig()``.
    """

    backbone: str = "resnet101"
    feature_dim: int = 512
    n_mlp_fg: int = 100  # learned foreground prototypes (MLP width)
    n_mlp_bg: int = 600
    n_keep_fg: int = 50  # of which kept at random
    n_keep_bg: int = 500
    n_query_fg: int = 50  # PGQP samples of the query
    n_query_bg: int = 100
    n_edge: int = 50  # samples in the inner / outer edge band
    edge_kernel: int = 3  # square structuring element of the edge bands
    edge_iters: Optional[int] = None  # None: the authors' 2 at 256 px, scaled to the image (mgsp.band_iterations)
    tau_fg: float = 0.5  # PGQP thresholds (CT: 0.7 / 0.6)
    tau_bg: float = 0.5
    cos_scaler: float = 20.0  # QPG cosine scale
    prior_temperature: float = 0.5  # QPG sigmoid slope
    dropout: float = 0.2  # MLP dropout and decoder channel dropout
    query_loss_weights: tuple[float, float] = (0.1, 1.0)  # NLL weights [background, foreground]
    align_weight: float = 1.0
    proto_weight: float = 0.3
    boundary_weight: float = 0.8
    boundary_theta0: int = 3
    boundary_theta: int = 5
    fast_mlp: bool = True  # fold upsampling + fill map into the MLP weight (same numbers, faster)
    decoder_winograd: bool = True  # decoder 3x3 convolutions by Winograd on the CPU (same numbers, faster)
    # Multi-shot choices (no effect with one shot); README "Where this differs from the reference code".
    proto_loss_shots: str = "mean"  # prototype-consistency loss over shots: "mean" (ours) | "sum" (reference)
    empty_support_rule: str = "any"  # ADNet fallback when "any" shot's mask is empty (ours) | "first" (reference)
    # Q-Net's keys (model='qnet', models/qnet.py; the other models refuse them, config.py).
    qnet_alpha: float = 0.9  # weight of the layer3 path, layer4 gets 1 - alpha (authors' config.py L65; Setting 2: 0.6)
    qnet_refine_iters: int = 7  # test-time prototype refinement: Adam steps per path and slice (authors' config.py L72); 0 = off

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """Take the known keys of a flat config (missing keys keep the reference default)."""
        values = {f.name: cfg[f.name] for f in fields(cls) if f.name in cfg}
        if "query_loss_weights" in values:
            values["query_loss_weights"] = tuple(float(w) for w in values["query_loss_weights"])
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        for keep, total, name in ((self.n_keep_fg, self.n_mlp_fg, "fg"), (self.n_keep_bg, self.n_mlp_bg, "bg")):
            if not 0 < keep <= total:
                raise ValueError(f"n_keep_{name}: expected 0 < n_keep_{name} <= n_mlp_{name} = {total}, got {keep}")
        for name in ("tau_fg", "tau_bg", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: expected a value in [0, 1), got {getattr(self, name)}")
        if self.edge_kernel < 1 or self.edge_kernel % 2 == 0:
            raise ValueError(f"edge_kernel: expected an odd size >= 1, got {self.edge_kernel}")
        if self.edge_iters is not None and (isinstance(self.edge_iters, bool) or not isinstance(self.edge_iters, int)
                                            or self.edge_iters < 1):
            raise ValueError(f"edge_iters: expected None (the authors' band width scaled to image_size) or an "
                             f"integer >= 1, got {self.edge_iters!r}")
        for name, allowed in (("proto_loss_shots", PROTO_LOSS_SHOTS), ("empty_support_rule", EMPTY_SUPPORT_RULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {list(allowed)}, got {getattr(self, name)!r}")
        if len(self.query_loss_weights) != 2:
            raise ValueError(f"query_loss_weights: expected [background, foreground], got {self.query_loss_weights}")
        if not 0.0 <= self.qnet_alpha <= 1.0:
            raise ValueError(f"qnet_alpha: expected a weight in [0, 1], got {self.qnet_alpha}")
        if not (isinstance(self.qnet_refine_iters, int) and self.qnet_refine_iters >= 0):
            raise ValueError(f"qnet_refine_iters: expected an integer >= 0 (0 = no refinement), got {self.qnet_refine_iters!r}")

    @property
    def n_fg(self) -> int:
        """Foreground prototypes: query | kept MLP | edge | MAP (152 with the defaults)."""
        return self.n_query_fg + self.n_keep_fg + self.n_edge + N_MAP

    @property
    def n_bg(self) -> int:
        """Background prototypes (652 with the defaults)."""
        return self.n_query_bg + self.n_keep_bg + self.n_edge + N_MAP


def prior_thresholds(modality: str | None) -> tuple[float, float]:
    """The default ``(tau_fg, tau_bg)`` of a dataset of ``modality``: ``CT_PRIOR_THRESHOLDS`` for
    ``'CT'``, ``ModelConfig``'s (the reference's MR values) otherwise; the one rule, read by
    ``config.py`` and ``tools.convert``."""
    return CT_PRIOR_THRESHOLDS if modality == "CT" else (ModelConfig.tau_fg, ModelConfig.tau_bg)


@dataclass
class SupportState:
    """Everything computed from the support once (``QAMP.encode_support``).

    feats ``S x C x h x w``; masks ``S x H x W``; prototype ``C`` (MAP over the masks, shot mean);
    fg / bg ``P' x C`` support parts of the prototype sets (shot mean), None when ``empty``.
    """

    feats: torch.Tensor
    masks: torch.Tensor
    prototype: torch.Tensor
    fg: Optional[torch.Tensor] = None
    bg: Optional[torch.Tensor] = None
    empty: bool = field(default=False)


def _require_generator(generator: Optional[torch.Generator]) -> torch.Generator:
    if generator is None:
        raise ValueError("QAMP samples prototypes at random: pass generator=models.make_generator(seed, ...)")
    return generator


def check_image_size(images: torch.Tensor, image_size: tuple[int, int], what: str) -> None:
    """Refuse images whose ``H x W`` is not the size the model (its MLPs) was built for."""
    if tuple(images.shape[-2:]) != tuple(image_size):
        H, W = image_size
        raise ValueError(f"{what}: the model was built for {H} x {W} images (MLP in_features = {H * W}), "
                         f"got {images.shape[-2]} x {images.shape[-1]}: resample the data to {H} x {W} "
                         "or build/train a model for this size")


def check_episode(supp_imgs: torch.Tensor, qry_imgs: torch.Tensor, image_size: tuple[int, int]) -> None:
    """One episode: ``supp_imgs 1 x S x 3 x H x W`` and ``qry_imgs 1 x 3 x H x W`` at the model's size."""
    if supp_imgs.dim() != 5 or supp_imgs.shape[0] != 1 or qry_imgs.shape[0] != 1:
        raise ValueError(f"expected supp_imgs 1 x S x 3 x H x W and qry_imgs 1 x 3 x H x W (one episode), "
                         f"got {tuple(supp_imgs.shape)} and {tuple(qry_imgs.shape)}")
    check_image_size(supp_imgs, image_size, "supp_imgs")
    check_image_size(qry_imgs, image_size, "qry_imgs")


class QAMP(nn.Module):
    """QAMP for images of a fixed size (the MLPs have ``H * W`` inputs).

    Args:
        config: hyper-parameters (``ModelConfig.from_config(cfg)``).
        image_size: ``(H, W)`` of the training / test images.
    """

    def __init__(self, config: ModelConfig, image_size: tuple[int, int]):
        super().__init__()
        self.config = config
        self.image_size = tuple(image_size)
        self.edge_iters = band_iterations(config.edge_iters, config.edge_kernel, self.image_size)  # resolved once
        n_positions = self.image_size[0] * self.image_size[1]
        self.encoder = Encoder(config.backbone, config.feature_dim)
        self.fg_mlp = PrototypeMLP(n_positions, config.n_mlp_fg, config.dropout)
        self.bg_mlp = PrototypeMLP(n_positions, config.n_mlp_bg, config.dropout)
        self.fg_decoder = SimilarityDecoder(config.n_fg, config.n_fg - N_MAP, config.dropout, config.decoder_winograd)
        self.bg_decoder = SimilarityDecoder(config.n_bg, config.n_bg - N_MAP, config.dropout, config.decoder_winograd)

    def _grid(self, feats: torch.Tensor) -> UpsampleGrid:
        return UpsampleGrid(tuple(feats.shape[-2:]), self.image_size, feats.device, feats.dtype)

    # ---- support side (MGSP) ------------------------------------------------------------------
    def _folded_weights(self, grid: UpsampleGrid) -> dict[str, Optional[torch.Tensor]]:
        """The MLPs' first layers folded with upsampling, once per step (fast path only)."""
        if not self.config.fast_mlp:
            return {"fg": None, "bg": None}
        return {"fg": folded_weight(self.fg_mlp, grid), "bg": folded_weight(self.bg_mlp, grid)}

    def _support_state(self, feats: torch.Tensor, masks: torch.Tensor, grid: UpsampleGrid,
                       generator: torch.Generator, folded: dict[str, Optional[torch.Tensor]]) -> SupportState:
        """``feats: S x C x h x w``, ``masks: S x H x W`` -> SupportState."""
        cfg = self.config
        prototype = grid.masked_average(feats, masks).mean(dim=0)  # (C,) QPG's p0
        empty = masks.sum(dim=(-2, -1)) == 0  # (S,)
        if bool(empty.any() if cfg.empty_support_rule == "any" else empty[0]):
            return SupportState(feats, masks, prototype, empty=True)  # ADNet fallback
        inner, outer = edge_bands(masks, cfg.edge_kernel, self.edge_iters)
        shots = range(feats.shape[0])
        fg = torch.stack([class_support_prototypes(feats[s], masks[s], inner[s], self.fg_mlp, cfg.n_keep_fg, cfg.n_edge,
                                                   grid, generator, cfg.fast_mlp, folded["fg"]) for s in shots])
        bg = torch.stack([class_support_prototypes(feats[s], 1 - masks[s], outer[s], self.bg_mlp, cfg.n_keep_bg,
                                                   cfg.n_edge, grid, generator, cfg.fast_mlp, folded["bg"])
                          for s in shots])
        return SupportState(feats, masks, prototype, fg.mean(dim=0), bg.mean(dim=0))

    # ---- query side (QPG, PGQP, decoders) -----------------------------------------------------
    def _query_heads(self, feats: torch.Tensor, prior: torch.Tensor, n_shots: int, grid: UpsampleGrid,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """PGQP samples per slice (shot mean): ``N x n_query_fg x C`` and ``N x n_query_bg x C``."""
        cfg = self.config
        fg, bg = [], []
        for n in range(feats.shape[0]):
            fg.append(torch.stack([query_prototypes(feats[n], prior[n], cfg.tau_fg, cfg.n_query_fg, grid, generator)
                                   for _ in range(n_shots)]).mean(dim=0))
            bg.append(torch.stack([query_prototypes(feats[n], 1 - prior[n], cfg.tau_bg, cfg.n_query_bg, grid,
                                                    generator) for _ in range(n_shots)]).mean(dim=0))
        return torch.stack(fg), torch.stack(bg)

    def _predict(self, state: SupportState, feats: torch.Tensor, thresholds: torch.Tensor, grid: UpsampleGrid,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Predict ``N`` query images from their features ``N x C x h x w`` and thresholds ``N``."""
        cfg = self.config
        prior = query_prior(feats, state.prototype, thresholds, cfg.cos_scaler, cfg.prior_temperature)  # (N, h, w)
        prior = grid.up(prior[:, None])[:, 0]  # (N, H, W)
        if state.empty:
            return {"pred": torch.stack([1 - prior, prior], dim=1), "prior": prior}
        n = feats.shape[0]
        query_fg, query_bg = self._query_heads(feats, prior, state.feats.shape[0], grid, generator)
        fg = torch.cat([query_fg, state.fg.expand(n, -1, -1)], dim=1)  # (N, P_fg, C)
        bg = torch.cat([query_bg, state.bg.expand(n, -1, -1)], dim=1)  # (N, P_bg, C)
        fg_logit = self.fg_decoder(cosine_maps(feats, fg), generator)  # (N, 1, h, w)
        bg_logit = self.bg_decoder(cosine_maps(feats, bg), generator)
        pred = torch.softmax(grid.up(torch.cat([bg_logit, fg_logit], dim=1)), dim=1)  # (N, 2, H, W)
        return {"pred": pred, "prior": prior, "fg_prototypes": fg, "bg_prototypes": bg}

    # ---- losses -------------------------------------------------------------------------------
    def _losses(self, state: SupportState, query_feats: torch.Tensor, threshold: torch.Tensor,
                forward_out: dict[str, torch.Tensor], labels: torch.Tensor, grid: UpsampleGrid,
                generator: torch.Generator, folded: dict[str, Optional[torch.Tensor]]) -> dict[str, torch.Tensor]:
        cfg = self.config
        pred = forward_out["pred"]
        zero = pred.new_zeros(())
        losses = {"query": nll_loss(pred, labels, cfg.query_loss_weights),
                  "align": zero, "proto": zero,
                  "boundary": boundary_f1_loss(pred, labels, cfg.boundary_theta0, cfg.boundary_theta)}
        if state.empty:
            losses["align"] = prior_alignment_loss(query_feats, pred, state.feats, state.masks, threshold, grid,
                                                   cfg.cos_scaler, cfg.prior_temperature)
            return losses
        pred_mask = (pred.argmax(dim=1) == 1).to(pred.dtype)  # (1, H, W)
        if not bool(pred_mask.any()):
            return losses  # reverse terms skipped, as in the reference
        # Reverse direction: the query with its predicted mask segments each support shot.
        reverse_state = self._support_state(query_feats, pred_mask, grid, generator, folded)
        n_shots = state.feats.shape[0]
        reverse = self._predict(reverse_state, state.feats, threshold.expand(n_shots), grid, generator)
        losses["align"] = nll_loss(reverse["pred"], state.masks.long())
        proto = []
        for s in range(n_shots):
            fg = regroup_by_origin(forward_out["fg_prototypes"][0], reverse["fg_prototypes"][s], cfg.n_query_fg)
            bg = regroup_by_origin(forward_out["bg_prototypes"][0], reverse["bg_prototypes"][s], cfg.n_query_bg)
            proto.append(prototype_consistency_loss(fg[0], fg[1], bg[0], bg[1]))
        proto = torch.stack(proto)
        losses["proto"] = proto.mean() if cfg.proto_loss_shots == "mean" else proto.sum()
        return losses

    def weighted_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """``query + align_weight * align + proto_weight * proto + boundary_weight * boundary``."""
        cfg = self.config
        return (losses["query"] + cfg.align_weight * losses["align"] + cfg.proto_weight * losses["proto"]
                + cfg.boundary_weight * losses["boundary"])

    # ---- public API ---------------------------------------------------------------------------
    def forward(self, supp_imgs: torch.Tensor, supp_masks: torch.Tensor, qry_imgs: torch.Tensor,
                qry_labels: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        """One episode.

        Args:
            supp_imgs: ``B x S x 3 x H x W``; supp_masks: ``B x S x H x W`` in {0, 1};
            qry_imgs: ``B x 3 x H x W``; qry_labels: ``B x H x W`` int64 in {0, 1} (255 ignored by
            the NLL) or None; generator: required. ``B`` must be 1.

        Returns:
            ``pred`` ``B x 2 x H x W`` probabilities [bg, fg]; ``prior`` ``B x H x W`` in [0, 1];
            with labels also ``losses`` (unweighted 'query', 'align', 'proto', 'boundary') and ``loss``;
            ``monitors``: ``threshold``, the mean of the queries' thresholds ``t`` (logged by train.py).
        """
        generator = _require_generator(generator)
        check_episode(supp_imgs, qry_imgs, self.image_size)
        n_shots = supp_imgs.shape[1]
        feats, thresholds = self.encoder(torch.cat([supp_imgs[0], qry_imgs]))  # support + query in one batch
        grid = self._grid(feats)
        folded = self._folded_weights(grid)  # shared by the forward and the reverse direction
        state = self._support_state(feats[:n_shots], supp_masks[0].to(feats.dtype), grid, generator, folded)
        out = self._predict(state, feats[n_shots:], thresholds[n_shots:], grid, generator)
        result: dict[str, Any] = {"pred": out["pred"], "prior": out["prior"],
                                  "monitors": {"threshold": thresholds[n_shots:].detach().mean()}}
        if qry_labels is not None:
            losses = self._losses(state, feats[n_shots:], thresholds[n_shots:], out, qry_labels, grid, generator,
                                  folded)
            result["losses"] = losses
            result["loss"] = self.weighted_loss(losses)
        return result

    def encode_support(self, supp_imgs: torch.Tensor, supp_masks: torch.Tensor,
                       generator: Optional[torch.Generator] = None,
                       feats: Optional[torch.Tensor] = None) -> SupportState:
        """Support features and support-side prototypes, once per support (``1 x S x 3 x H x W``).

        ``feats``: the support's encoder features ``S x C x h x w`` (``self.encoder(supp_imgs[0])[0]``)
        when already computed, e.g. cached across query scans by test.py; the encoder is skipped then.
        """
        generator = _require_generator(generator)
        check_image_size(supp_imgs, self.image_size, "supp_imgs")
        if feats is None:
            feats, _ = self.encoder(supp_imgs[0])
        grid = self._grid(feats)
        return self._support_state(feats, supp_masks[0].to(feats.dtype), grid, generator, self._folded_weights(grid))

    def segment(self, state: SupportState, qry_imgs: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Predict ``N`` query slices (``N x 3 x H x W``) in one batch: ``pred N x 2 x H x W``, ``prior N x H x W``."""
        generator = _require_generator(generator)
        check_image_size(qry_imgs, self.image_size, "qry_imgs")
        feats, thresholds = self.encoder(qry_imgs)
        out = self._predict(state, feats, thresholds, self._grid(feats), generator)
        return {"pred": out["pred"], "prior": out["prior"]}
