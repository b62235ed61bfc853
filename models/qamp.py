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
3. ``forward`` with labels (training), after 1 and 2: the reverse pass, i.e. 1 for the query with
   its predicted mask, then 2 for each support shot (skipped when that mask is empty).
So ``segment`` over N slices equals N calls on one slice each with the same generator, and
``forward`` equals ``encode_support`` followed by ``segment`` (eval mode, up to float rounding).

The ablation switches (``ModelConfig.use_*``, docs/METHOD.md §3.7) remove their draws from this
order and shift the later ones, nothing else: ``use_mlp_prototypes=False`` removes the fill
positions, the MLP dropout and the kept columns (each class then draws only its edge samples);
``use_edge_samples=False`` the edge samples; ``use_query_prototypes=False`` every PGQP sample;
``use_alignment=False`` all of 3. The parts left draw in the same relative order, and no draw is
made for a part that is off (a model with a part off is not a model that draws and discards).
``use_proto_loss`` and ``use_boundary_loss`` draw nothing either way.
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
# QAMP's ablation switches (ModelConfig, docs/METHOD.md §3.7) and the keys each one leaves unread when False.
SWITCHED_KEYS = {
    "use_query_prototypes": ("n_query_fg", "n_query_bg", "tau_fg", "tau_bg"),
    "use_edge_samples": ("n_edge",),
    "use_mlp_prototypes": ("n_mlp_fg", "n_mlp_bg", "n_keep_fg", "n_keep_bg", "fast_mlp"),
    "use_alignment": ("align_weight",),
    "use_proto_loss": ("proto_weight", "proto_loss_shots"),
    "use_boundary_loss": ("boundary_weight", "boundary_theta0", "boundary_theta"),
}
ABLATION_KEYS = tuple(SWITCHED_KEYS)


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
    # Ablations (docs/METHOD.md §3.7): each False switches one part of QAMP off (its prototypes, draws,
    # parameters and loss term); all True is QAMP. model='gmrd' is QAMP's ancestor (models/gmrd.py).
    use_query_prototypes: bool = True  # PGQP query samples (False: none, no PGQP draws, narrower decoders)
    use_edge_samples: bool = True  # MGSP edge-band samples (False: none; the two band / mask MAPs stay)
    use_mlp_prototypes: bool = True  # MGSP learned prototypes (False: no MLPs, no fill-map / keep draws)
    use_alignment: bool = True  # the reverse pass and its alignment loss (the prototype loss needs it)
    use_proto_loss: bool = True  # the prototype-consistency loss (needs use_alignment)
    use_boundary_loss: bool = True  # the boundary-F1 loss
    # Q-Net's keys (model='qnet', models/qnet.py; the other models refuse them, config.py).
    qnet_alpha: float = 0.9  # weight of the layer3 path, layer4 gets 1 - alpha (authors' config.py L65; Setting 2: 0.6)
    qnet_refine_iters: int = 7  # test-time prototype refinement: Adam steps per path and slice (authors' config.py L72); 0 = off

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], model: str = "qamp") -> "ModelConfig":
        """Take the known keys of a flat config (missing keys keep the reference default) and
        validate them for ``model`` (the keys only QAMP reads are checked for 'qamp' only)."""
        values = {f.name: cfg[f.name] for f in fields(cls) if f.name in cfg}
        if "query_loss_weights" in values:
            values["query_loss_weights"] = tuple(float(w) for w in values["query_loss_weights"])
        config = cls(**values)
        config.validate(model)
        return config

    def validate(self, model: str = "qamp") -> None:
        """Raise a ValueError naming the key on a value the model cannot run with.

        ``model``: which network reads the config. ``n_keep_*`` and the ablation switches are QAMP's
        only (GMRD keeps every MLP prototype, so ``n_mlp_*`` below the default ``n_keep_*`` is fine there).
        """
        if model == "qamp":
            self._validate_qamp_parts()
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

    def _validate_qamp_parts(self) -> None:
        """QAMP's prototype counts and ablation switches: kept MLP prototypes within the MLP width, the
        switches booleans, the prototype loss with its reverse pass, and some sampled prototype left."""
        if self.use_mlp_prototypes:
            for keep, total, name in ((self.n_keep_fg, self.n_mlp_fg, "fg"), (self.n_keep_bg, self.n_mlp_bg, "bg")):
                if not 0 < keep <= total:
                    raise ValueError(f"n_keep_{name}: expected 0 < n_keep_{name} <= n_mlp_{name} = {total}, got {keep}")
        for name in ABLATION_KEYS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if self.use_proto_loss and not self.use_alignment:
            raise ValueError("use_proto_loss=True needs use_alignment=True: the prototype-consistency loss compares "
                             "the forward prototypes with those of the reverse pass (docs/METHOD.md §4); set "
                             "use_proto_loss=False too, or use_alignment=True")
        for name, sampled in (("fg", self.n_fg - N_MAP), ("bg", self.n_bg - N_MAP)):
            if sampled < 1:
                raise ValueError(f"no sampled {name} prototypes left (query samples, kept MLP prototypes and edge "
                                 f"samples add up to {sampled}): the {name} decoder would have no channels; keep one "
                                 "of use_query_prototypes / use_mlp_prototypes / use_edge_samples on with a count >= 1")

    @property
    def query_counts(self) -> tuple[int, int]:
        """PGQP samples ``(fg, bg)``: ``n_query_*``, or 0 with ``use_query_prototypes=False``."""
        return (self.n_query_fg, self.n_query_bg) if self.use_query_prototypes else (0, 0)

    @property
    def keep_counts(self) -> tuple[int, int]:
        """Kept MLP prototypes ``(fg, bg)``: ``n_keep_*``, or 0 with ``use_mlp_prototypes=False``."""
        return (self.n_keep_fg, self.n_keep_bg) if self.use_mlp_prototypes else (0, 0)

    @property
    def edge_count(self) -> int:
        """Edge samples per class: ``n_edge``, or 0 with ``use_edge_samples=False``."""
        return self.n_edge if self.use_edge_samples else 0

    @property
    def n_fg(self) -> int:
        """Foreground prototypes: query | kept MLP | edge | MAP (152 with the defaults)."""
        return self.query_counts[0] + self.keep_counts[0] + self.edge_count + N_MAP

    @property
    def n_bg(self) -> int:
        """Background prototypes (652 with the defaults)."""
        return self.query_counts[1] + self.keep_counts[1] + self.edge_count + N_MAP


def switched_off_keys(cfg: Mapping[str, Any]) -> dict[str, str]:
    """The keys QAMP does not read with the ablation switches of the flat config ``cfg`` (a missing
    switch is on): key -> the switch that turned its part off. config.py refuses them when given
    explicitly (they would be accepted and ignored); no other value of ``cfg`` is checked here."""
    unread: dict[str, str] = {}
    for switch, keys in SWITCHED_KEYS.items():
        if cfg.get(switch, True) is False:
            unread.update({key: switch for key in keys if key not in unread})
    return unread


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
        mlps = config.use_mlp_prototypes  # use_mlp_prototypes=False: no MLPs (no parameters, no draws)
        self.fg_mlp = PrototypeMLP(n_positions, config.n_mlp_fg, config.dropout) if mlps else None
        self.bg_mlp = PrototypeMLP(n_positions, config.n_mlp_bg, config.dropout) if mlps else None
        self.fg_decoder = SimilarityDecoder(config.n_fg, config.n_fg - N_MAP, config.dropout, config.decoder_winograd)
        self.bg_decoder = SimilarityDecoder(config.n_bg, config.n_bg - N_MAP, config.dropout, config.decoder_winograd)

    def _grid(self, feats: torch.Tensor) -> UpsampleGrid:
        return UpsampleGrid(tuple(feats.shape[-2:]), self.image_size, feats.device, feats.dtype)

    # ---- support side (MGSP) ------------------------------------------------------------------
    def _folded_weights(self, grid: UpsampleGrid) -> dict[str, Optional[torch.Tensor]]:
        """The MLPs' first layers folded with upsampling, once per step (fast path only)."""
        if not self.config.fast_mlp or self.fg_mlp is None:
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
        (keep_fg, keep_bg), n_edge = cfg.keep_counts, cfg.edge_count
        fg = torch.stack([class_support_prototypes(feats[s], masks[s], inner[s], self.fg_mlp, keep_fg, n_edge,
                                                   grid, generator, cfg.fast_mlp, folded["fg"]) for s in shots])
        bg = torch.stack([class_support_prototypes(feats[s], 1 - masks[s], outer[s], self.bg_mlp, keep_bg,
                                                   n_edge, grid, generator, cfg.fast_mlp, folded["bg"])
                          for s in shots])
        return SupportState(feats, masks, prototype, fg.mean(dim=0), bg.mean(dim=0))

    # ---- query side (QPG, PGQP, decoders) -----------------------------------------------------
    def _query_heads(self, feats: torch.Tensor, prior: torch.Tensor, n_shots: int, grid: UpsampleGrid,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """PGQP samples per slice (shot mean): ``N x n_query_fg x C`` and ``N x n_query_bg x C``
        (``N x 0 x C``, nothing drawn, with ``use_query_prototypes=False``)."""
        cfg = self.config
        if not cfg.use_query_prototypes:
            none = feats.new_zeros(feats.shape[0], 0, feats.shape[1])
            return none, none
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
        losses = {"query": nll_loss(pred, labels, cfg.query_loss_weights)}  # a part switched off: no term
        losses.update({name: zero for name, on in (("align", cfg.use_alignment), ("proto", cfg.use_proto_loss)) if on})
        if cfg.use_boundary_loss:
            losses["boundary"] = boundary_f1_loss(pred, labels, cfg.boundary_theta0, cfg.boundary_theta)
        if not cfg.use_alignment:
            return losses  # no reverse pass (and no prototype loss, which needs it): nothing drawn for it
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
        if not cfg.use_proto_loss:
            return losses
        proto = []
        head_fg, head_bg = cfg.query_counts  # 0 without PGQP: the forward set is support-, the reverse query-derived
        for s in range(n_shots):
            fg = regroup_by_origin(forward_out["fg_prototypes"][0], reverse["fg_prototypes"][s], head_fg)
            bg = regroup_by_origin(forward_out["bg_prototypes"][0], reverse["bg_prototypes"][s], head_bg)
            proto.append(prototype_consistency_loss(fg[0], fg[1], bg[0], bg[1]))
        proto = torch.stack(proto)
        losses["proto"] = proto.mean() if cfg.proto_loss_shots == "mean" else proto.sum()
        return losses

    def weighted_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """``query + align_weight * align + proto_weight * proto + boundary_weight * boundary``, over the
        terms present (a part switched off has none), added in that order."""
        cfg = self.config
        loss = losses["query"]
        for name, weight in (("align", cfg.align_weight), ("proto", cfg.proto_weight),
                             ("boundary", cfg.boundary_weight)):
            if name in losses:
                loss = loss + weight * losses[name]
        return loss

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
            with labels also ``losses`` (unweighted 'query', 'align', 'proto', 'boundary'; a term whose
            part is switched off, ``use_*=False``, is absent) and ``loss``;
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
            feats, _ = self.encoder(supp_imgs[0], threshold=False)  # support thresholds are unused
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
