"""GMRD (Cheng et al., "Few-shot medical image segmentation via generating multiple representative
descriptors", IEEE TMI 2024) on this project's encoder (``model='gmrd'``): QAMP's ancestor.

The numbers are those of the authors' code, github.com/zmcheng9/GMRD at commit 45ba5c2 (2023-11-02,
the paper's version): the head in ``models/fewshot_GMRD.py`` (``FewShotSeg``), its MLP and decoder in
``models/moudles.py``, the loss weights in ``train.py``, the schedule in ``scripts/train.sh``. Each
constant below names the line it comes from. The repository's HEAD (d093dce, 2024-12-30) removed the
auxiliary descriptor loss and the MLP's ReLU (commits 6d42639, d093dce, 95e37b9), and its ``test.py``
then unpacks three outputs of a model that returns two; 45ba5c2 is the code the paper describes.

Per class, from the support mask ``M`` of each shot (features ``up(Fs)``: bilinear, aligned corners):

* **foreground descriptors**: the MLP over the ``H*W`` positions of the fill map (``up(Fs)`` with the
  positions outside ``M`` overwritten by in-mask vectors drawn at random, as QAMP's; fewshot_GMRD.py
  L291-292, L342-353), ``Linear(H*W, 100) -> Dropout(0.2) -> ReLU -> Linear(100, 100)`` (moudles.py
  L9-16): all 100 (``n_mlp_fg``), in order; then ``MAP(M)`` and ``MAP(M - erode(M))`` (L284-293);
* **background descriptors**: the same with ``1 - M`` and an MLP of width 600 (``n_mlp_bg``); its band
  average is over ``dilate(1 - M) - M`` (L305-306), which is 1 on the background, 0 on the inner band
  and -1 inside ``erode(M)``: the authors' code, not the outer band ``dilate(M) - M`` of the paper and
  of QAMP (docs/DIFFERENCES.md);
* with several shots each set is the shot mean (L364); the bands use ``edge_kernel`` / ``edge_iters``
  (the authors' 3 x 3 kernel twice at 256 px, scaled with the image as QAMP's, ``mgsp.band_iterations``).

Prediction: the cosine maps of the query features with each set (L378-381) go through the class's
decoder (moudles.py L23-48: QAMP's ``SimilarityDecoder`` with a last 3 x 3 convolution to 100 channels
whatever the set size, and channel dropout 0.1); the two logit maps, up-sampled (aligned corners), give
the softmax ``[bg, fg]`` (L113-117). When every shot's mask is empty (L83) the prediction is ADNet's:
``[1 - P0, P0]`` with ``P0 = 1 - sigmoid(0.5 (-20 cos(Fq, MAP(Fs, M)) - t))``, ``t`` the query's
threshold from the encoder (L73-75, L89-93, L144-145).

Losses (``out['losses']``, unweighted; ``out['loss']`` = query + align + 0.5 aux, train.py L111-117):

* ``query``: NLL of the clamped prediction, class weights [0.1, 1.0], label 255 ignored (train.py L65-66, L114);
* ``align``: the query with its predicted mask (argmax at ``H x W``) gives descriptors the same way,
  drawn anew for every shot, which segment that shot; unweighted NLL against the support mask,
  divided by the number of shots (L222-274); zero when no query pixel is predicted foreground (L235);
  with the empty-support fallback, ADNet's alignment with ``t`` (L183-220, ``losses.prior_alignment_loss``);
* ``aux``: ``losses.descriptor_loss`` of the forward (support) and reverse (query) sets, summed over
  shots (L252, L404-429); zero when the alignment is skipped or the support is empty.

Random draws (the caller's ``torch.Generator``): for foreground then background, for each shot, the
fill positions, then the MLP dropout (training); the decoders' channel dropout (training) per prediction,
foreground first; in training the reverse pass per shot in the same order. Nothing is drawn from the
query side, so ``segment`` over N slices equals N calls on one slice each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from models.decoder import SimilarityDecoder, cosine_maps
from models.encoder import Encoder
from models.losses import descriptor_loss, nll_loss, prior_alignment_loss, support_labels
from models.mgsp import (N_MAP, PrototypeMLP, band_iterations, class_support_prototypes, dilate, edge_bands,
                         folded_weight)
from models.qamp import ModelConfig, SupportState, check_episode, check_image_size
from models.qpg import query_prior
from models.sampling import UpsampleGrid

AUTHORS_COMMIT = "45ba5c2703bfe9c2c99d83064869518260164d3f"  # github.com/zmcheng9/GMRD, 2023-11-02
SCALER = 20.0  # cosine scale of the fallback prior: fewshot_GMRD.py L25, L144
SLOPE = 0.5  # sigmoid slope of the fallback prior: fewshot_GMRD.py L145
QUERY_WEIGHTS = (0.1, 1.0)  # NLL class weights [bg, fg], label 255 ignored: train.py L65-66
# The ModelConfig keys GMRD reads: the encoder's, its descriptor counts (the MLP widths, shared with
# QAMP: 100 / 600 are GMRD's fg_num / bg_num, fewshot_GMRD.py L28-29), the edge bands and the two
# compute-only switches. Every other number is the authors' (GMRDConstants); QAMP's other keys are refused.
GMRD_KEYS = ("backbone", "feature_dim", "n_mlp_fg", "n_mlp_bg", "edge_kernel", "edge_iters", "fast_mlp",
             "decoder_winograd")


@dataclass(frozen=True)
class GMRDConstants:
    """The authors' numbers where GMRD and QAMP differ; ``AUTHORS`` is GMRD. Another instance exists
    for tests only: with ``QAMP_PARTS`` the head computes what QAMP with its additions off computes."""

    mlp_dropout: float = 0.2  # moudles.py L11
    mlp_relu: bool = True  # moudles.py L12 (removed by 6d42639; QAMP's modules.py L14 has it commented out)
    decoder_width: Optional[int] = 100  # the last 3x3 conv's channels: moudles.py L37, L40 (QAMP: the set size - 2)
    decoder_dropout: float = 0.1  # moudles.py L39 (QAMP 0.2)
    authors_background_band: bool = True  # dilate(1 - M) - M: fewshot_GMRD.py L305-306 (QAMP: dilate(M) - M)
    aux_weight: float = 0.5  # train.py L112


AUTHORS = GMRDConstants()
QAMP_PARTS = GMRDConstants(mlp_relu=False, decoder_width=None, decoder_dropout=0.2, authors_background_band=False)


def background_band(masks: torch.Tensor, kernel: int, iterations: int, authors: bool) -> torch.Tensor:
    """Weights of the background's band average, ``S x H x W``.

    ``authors``: ``dilate(1 - M) - M`` (fewshot_GMRD.py L305-306, cv2.dilate of the *background*):
    1 on the background, 0 on the inner band ``M - erode(M)``, -1 on ``erode(M)``. Otherwise the
    outer band ``dilate(M) - M`` (QAMP, ``mgsp.edge_bands``).
    """
    if authors:
        return dilate(1 - masks, kernel, iterations) - masks
    return edge_bands(masks, kernel, iterations)[1]


class GMRD(nn.Module):
    """GMRD with ``models.qamp.QAMP``'s call signatures (``generator`` required: the fill maps draw).

    Args:
        config: ``ModelConfig``; reads ``GMRD_KEYS`` only.
        image_size: ``(H, W)`` of the images (the MLPs have ``H * W`` inputs).
        constants: the authors' numbers (``AUTHORS``); tests pass ``QAMP_PARTS``.
    """

    def __init__(self, config: ModelConfig, image_size: tuple[int, int], constants: GMRDConstants = AUTHORS):
        super().__init__()
        self.config = config
        self.constants = constants
        self.image_size = tuple(image_size)
        self.edge_iters = band_iterations(config.edge_iters, config.edge_kernel, self.image_size)
        n_positions = self.image_size[0] * self.image_size[1]
        self.encoder = Encoder(config.backbone, config.feature_dim)
        self.fg_mlp = PrototypeMLP(n_positions, config.n_mlp_fg, constants.mlp_dropout, constants.mlp_relu)
        self.bg_mlp = PrototypeMLP(n_positions, config.n_mlp_bg, constants.mlp_dropout, constants.mlp_relu)
        # Decoder(fg_num): a 1x1 conv from fg_num + 2 to fg_num channels (moudles.py L28), fewshot_GMRD.py L32-33
        self.fg_decoder = SimilarityDecoder(config.n_mlp_fg + N_MAP, config.n_mlp_fg, constants.decoder_dropout,
                                            config.decoder_winograd, constants.decoder_width)
        self.bg_decoder = SimilarityDecoder(config.n_mlp_bg + N_MAP, config.n_mlp_bg, constants.decoder_dropout,
                                            config.decoder_winograd, constants.decoder_width)

    def _grid(self, feats: torch.Tensor) -> UpsampleGrid:
        return UpsampleGrid(tuple(feats.shape[-2:]), self.image_size, feats.device, feats.dtype)

    def _folded_weights(self, grid: UpsampleGrid) -> dict[str, Optional[torch.Tensor]]:
        if not self.config.fast_mlp:
            return {"fg": None, "bg": None}
        return {"fg": folded_weight(self.fg_mlp, grid), "bg": folded_weight(self.bg_mlp, grid)}

    def _support_state(self, feats: torch.Tensor, masks: torch.Tensor, grid: UpsampleGrid,
                       generator: torch.Generator, folded: dict[str, Optional[torch.Tensor]]) -> SupportState:
        """``feats: S x C x h x w``, ``masks: S x H x W`` -> descriptors ``(n_mlp + 2) x C`` per class (shot mean)."""
        cfg = self.config
        prototype = grid.masked_average(feats, masks).mean(dim=0)  # (C,) the fallback's, L84-86
        if bool((masks.sum(dim=(-2, -1)) == 0).all()):  # every shot empty: L83 sums the shots' masks
            return SupportState(feats, masks, prototype, empty=True)
        inner = edge_bands(masks, cfg.edge_kernel, self.edge_iters)[0]  # M - erode(M): L284
        outer = background_band(masks, cfg.edge_kernel, self.edge_iters, self.constants.authors_background_band)
        shots = range(feats.shape[0])
        # all MLP descriptors in order (n_keep None), no edge samples (n_edge 0): L292-293, L314-315
        fg = torch.stack([class_support_prototypes(feats[s], masks[s], inner[s], self.fg_mlp, None, 0, grid,
                                                   generator, cfg.fast_mlp, folded["fg"]) for s in shots])
        bg = torch.stack([class_support_prototypes(feats[s], 1 - masks[s], outer[s], self.bg_mlp, None, 0, grid,
                                                   generator, cfg.fast_mlp, folded["bg"]) for s in shots])
        return SupportState(feats, masks, prototype, fg.mean(dim=0), bg.mean(dim=0))

    def _predict(self, state: SupportState, feats: torch.Tensor, thresholds: torch.Tensor, grid: UpsampleGrid,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``N x C x h x w`` query features, thresholds ``N`` -> ``pred`` ``N x 2 x H x W``."""
        if state.empty:  # ADNet's prediction (L89-93)
            prior = grid.up(query_prior(feats, state.prototype, thresholds, SCALER, SLOPE)[:, None])[:, 0]
            return {"pred": torch.stack([1 - prior, prior], dim=1)}
        n = feats.shape[0]
        fg_logit = self.fg_decoder(cosine_maps(feats, state.fg.expand(n, -1, -1)), generator)  # (N, 1, h, w)
        bg_logit = self.bg_decoder(cosine_maps(feats, state.bg.expand(n, -1, -1)), generator)
        return {"pred": torch.softmax(grid.up(torch.cat([bg_logit, fg_logit], dim=1)), dim=1)}  # L113-117

    def _losses(self, state: SupportState, query_feats: torch.Tensor, threshold: torch.Tensor, pred: torch.Tensor,
                labels: torch.Tensor, grid: UpsampleGrid, generator: torch.Generator,
                folded: dict[str, Optional[torch.Tensor]]) -> dict[str, torch.Tensor]:
        zero = pred.new_zeros(())
        losses = {"query": nll_loss(pred, labels, QUERY_WEIGHTS), "align": zero, "aux": zero}
        if state.empty:  # alignLoss (L96, L183-220); no aux loss
            losses["align"] = prior_alignment_loss(query_feats, pred, state.feats, state.masks, threshold, grid,
                                                   SCALER, SLOPE)
            return losses
        pred_mask = (pred.argmax(dim=1) == 1).to(pred.dtype)  # (1, H, W), L233-236
        if not bool(pred_mask.any()):
            return losses  # skip_ways: both terms zero
        n_shots = state.feats.shape[0]
        labels_s = support_labels(state.masks)
        align, aux = [], []
        for s in range(n_shots):  # L245: the query's descriptors are drawn anew for every shot
            reverse = self._support_state(query_feats, pred_mask, grid, generator, folded)
            aux.append(descriptor_loss(state.fg, reverse.fg, state.bg, reverse.bg, N_MAP))  # L252
            supp_pred = self._predict(reverse, state.feats[s:s + 1], threshold, grid, generator)["pred"]
            align.append(nll_loss(supp_pred, labels_s[s:s + 1]) / n_shots)  # L272
        losses["align"] = torch.stack(align).sum()
        losses["aux"] = torch.stack(aux).sum()  # summed over shots, not averaged (L252)
        return losses

    def weighted_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """``query + align + 0.5 aux`` (train.py L112, L117)."""
        return losses["query"] + losses["align"] + self.constants.aux_weight * losses["aux"]

    def forward(self, supp_imgs: torch.Tensor, supp_masks: torch.Tensor, qry_imgs: torch.Tensor,
                qry_labels: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        """One episode, as ``QAMP.forward``.

        Returns:
            ``pred`` ``1 x 2 x H x W`` probabilities [bg, fg]; ``monitors`` ``{"threshold"}`` (the mean
            query threshold ``t``, used only by the empty-support fallback); with labels also ``losses``
            (unweighted 'query', 'align', 'aux') and ``loss``. No ``prior`` (GMRD has no query prior).
        """
        generator = _generator(generator)
        check_episode(supp_imgs, qry_imgs, self.image_size)
        n_shots = supp_imgs.shape[1]
        # support + query in one batch; the thresholds (layer4) always, as the authors' (L64), so that
        # layer4's batch-norm statistics move every step even though t serves the fallback only
        feats, thresholds = self.encoder(torch.cat([supp_imgs[0], qry_imgs]))
        grid = self._grid(feats)
        folded = self._folded_weights(grid)
        state = self._support_state(feats[:n_shots], supp_masks[0].to(feats.dtype), grid, generator, folded)
        pred = self._predict(state, feats[n_shots:], thresholds[n_shots:], grid, generator)["pred"]
        result: dict[str, Any] = {"pred": pred, "monitors": {"threshold": thresholds[n_shots:].detach().mean()}}
        if qry_labels is not None:
            losses = self._losses(state, feats[n_shots:], thresholds[n_shots:], pred, qry_labels, grid, generator,
                                  folded)
            result["losses"] = losses
            result["loss"] = self.weighted_loss(losses)
        return result

    def encode_support(self, supp_imgs: torch.Tensor, supp_masks: torch.Tensor,
                       generator: Optional[torch.Generator] = None,
                       feats: Optional[torch.Tensor] = None) -> SupportState:
        """Support features and descriptors (``1 x S x 3 x H x W``); ``feats`` as in ``QAMP.encode_support``."""
        generator = _generator(generator)
        check_image_size(supp_imgs, self.image_size, "supp_imgs")
        if feats is None:
            feats, _ = self.encoder(supp_imgs[0], threshold=False)  # the support's threshold is never used
        grid = self._grid(feats)
        return self._support_state(feats, supp_masks[0].to(feats.dtype), grid, generator, self._folded_weights(grid))

    def segment(self, state: SupportState, qry_imgs: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """``N x 3 x H x W`` query slices -> ``pred N x 2 x H x W`` (one batch)."""
        generator = _generator(generator)
        check_image_size(qry_imgs, self.image_size, "qry_imgs")
        feats, thresholds = self.encoder(qry_imgs, threshold=state.empty)  # t: the empty-support fallback's only
        return {"pred": self._predict(state, feats, thresholds, self._grid(feats), generator)["pred"]}


def _generator(generator: Optional[torch.Generator]) -> torch.Generator:
    if generator is None:
        raise ValueError("GMRD draws its fill maps at random: pass generator=models.make_generator(seed, ...)")
    return generator
