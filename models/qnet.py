"""Q-Net head (Shen et al., 2022, "Query-informed few-shot medical image segmentation") on this
project's encoder (``model='qnet'``).

The numbers are those of the authors' code, github.com/shenqq377/Q-Net (commit 70a828d): the head in
``models/fewshot.py`` (``FewShotSeg``), its encoder outputs in ``models/encoder.py``, the losses in
``train.py``, the test-time settings in ``config.py`` / ``test.py`` and ``README.md``; each constant
below names the line it comes from. Only the encoder's backbone is this project's (``Encoder``,
docs/DIFFERENCES.md). Q-Net is ADNet (``models/adnet.py``) with three changes:

* **two feature paths**: ``reduce1(layer3)`` at ``H/4`` and ``reduce2(layer4)`` at ``H/8``
  (``feature_dim`` channels each), each with its own prototype and prediction; the two foreground
  probabilities, up-sampled to ``H x W`` (bilinear, ``align_corners=True``), are combined as
  ``(a p_3 + (1 - a) p_4) / (a + 1 - a)`` with ``a = qnet_alpha`` (0.9; 0.6 in Setting 2);
* **the query's own threshold** ``t = reduce1d(fc(avgpool(layer4)))`` (one per query image, a
  function of the query) replaces ADNet's learned ``T``, in both paths and in the alignment loss;
* **test-time prototype refinement** (eval mode, ``qnet_refine_iters`` > 0): per path and per
  query slice the prototype becomes a parameter, optimised by Adam (lr 0.01) for
  ``qnet_refine_iters`` (7) steps on a reconstruction loss: the BCE between ``sigmoid(mm(F))`` and
  ``sigmoid(mm(F'))``, where ``mm`` is the min-max normalisation over the whole ``C x h x w`` slice
  and ``F'`` is ``F`` with its predicted foreground cells replaced by the prototype. The mask is
  re-predicted with the current prototype before each step.

Per path, with prototype ``p`` (masked average of the support features up-sampled to the mask
size, bilinear ``align_corners=False``, shot mean): ``p_fg(x) = 1 - sigmoid(0.5 (-20 cos(F(x), p) - t))``.

Losses (``out['losses']``, unweighted; ``out['loss']`` = query + align, train.py L114; no threshold loss):

* ``query``: NLL of ``log(clamp(pred, eps, 1 - eps))``, class weights [0.1, 1.0], label 255 ignored;
* ``align``: the argmax of the combined query prediction at ``H x W`` is the query mask; per path
  the masked average of the up-sampled query features is a prototype that segments each support
  shot (the query's ``t``), combined as in the forward; unweighted NLL against the support mask,
  averaged over shots; zero when no query pixel is predicted foreground.

``t`` gets gradients (reduce1d, fc, layer4 and reduce2 all train). Refinement works under
``torch.inference_mode()`` / ``no_grad`` (the evaluation's), on detached copies of the features, and
leaves the model's weights untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.encoder import Encoder
from models.losses import nll_loss, support_labels
from models.qamp import ModelConfig, check_episode, check_image_size
from models.qpg import query_prior
from models.sampling import UpsampleGrid

SCALER = 20.0  # cosine scale: fewshot.py L22 (self.scaler = 20.0), used in getPred L167
SLOPE = 0.5  # sigmoid slope: fewshot.py L168 (1.0 - torch.sigmoid(0.5 * (sim - thresh)))
MAP_EPS = 1e-5  # masked-average denominator guard: fewshot.py L185 (getFeatures)
QUERY_WEIGHTS = (0.1, 1.0)  # NLL class weights [bg, fg], label 255 ignored: train.py L65-66
LOSS_WEIGHTS = {"query": 1.0, "align": 1.0}  # train.py L114 (loss = query_loss + align_loss; t_loss_scaler 0, config.py L60)
REFINE_LR = 0.01  # Adam learning rate of the refinement: fewshot.py L126
# qnet_alpha, the weight of the layer3 path (layer4: 1 - alpha, fewshot.py L24): config.py L65 / fewshot.py L15
# (0.9) and README.md L59-61 ("for setting 2, the alpha = [0.6, 0.4]"); ModelConfig holds 0.9.
SETTING2_ALPHA = 0.6
# qnet_refine_iters: config.py L72 (n_iters=7), passed by test.py L129-130; ModelConfig holds 7.


def default_alpha(setting: int) -> float:
    """The authors' ``alpha`` of a setting: 0.9 in Setting 1, 0.6 in Setting 2 (README.md L59-61)."""
    return SETTING2_ALPHA if setting == 2 else ModelConfig.qnet_alpha


class QNetEncoder(Encoder):
    """``Encoder`` whose forward also returns the ``reduce2(layer4)`` features (Q-Net's second path).

    Same modules and state-dict keys as ``Encoder`` (pretrained weights and snapshots load alike);
    only ``forward`` differs: the authors' ``Res101Encoder.forward`` (encoder.py L39-58).

    Shapes: ``forward(x: N x 3 x H x W) -> (N x C x h3 x w3, N x C x h4 x w4, N)`` with
    ``h3 = ceil(H/4)`` (layer3, dilated) and ``h4 = ceil(h3/2)`` (layer4, stride 2), ``C = feature_dim``.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.backbone
        x = b["maxpool"](b["relu"](b["bn1"](b["conv1"](x))))
        x = b["layer3"](b["layer2"](b["layer1"](x)))
        path3 = self.reduce1(x)  # (N, C, h3, w3) encoder.py L49
        x = b["layer4"](x)  # (N, 2048, h4, w4)
        path4 = self.reduce2(x)  # (N, C, h4, w4) encoder.py L51
        t = self.reduce1d(b["fc"](torch.flatten(b["avgpool"](x), 1)))  # (N, 1) encoder.py L54-57
        return path3, path4, t[:, 0]


@dataclass
class QNetSupport:
    """What ``QNet.encode_support`` computes once per support: per path (layer3, layer4) the
    features ``S x C x h x w`` and the prototype ``C``; the masks ``S x H x W``. ``feats`` is what
    ``engine.evaluate`` caches and hands back (``encode_support(..., feats=state.feats)``)."""

    feats: tuple[torch.Tensor, torch.Tensor]
    masks: torch.Tensor
    prototypes: tuple[torch.Tensor, torch.Tensor]


def path_weights(alpha: float, like: torch.Tensor) -> torch.Tensor:
    """``[alpha, 1 - alpha]`` (fewshot.py L24), float32 as the authors' ``torch.Tensor``."""
    return torch.tensor([alpha, 1 - alpha], dtype=like.dtype, device=like.device)


def masked_average(feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The authors' ``getFeatures`` (fewshot.py L172-187): features up-sampled to the mask size
    (bilinear, ``align_corners=False``: ``F.interpolate``'s default, L181) averaged under the mask.

    Args:
        feats: ``S x C x h x w``; masks: ``S x H x W`` in [0, 1].

    Returns:
        ``S x C``: ``sum_x up(F)(x) M(x) / (sum_x M(x) + 1e-5)``, computed as ``<F, up^T(M)>``
        (``UpsampleGrid.masked_average``: no ``C x H x W`` tensor; deterministic on CUDA).
    """
    grid = UpsampleGrid(tuple(feats.shape[-2:]), tuple(masks.shape[-2:]), feats.device, feats.dtype,
                        align_corners=False)
    return grid.masked_average(feats, masks)


def foreground_probability(feats: torch.Tensor, prototype: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``1 - sigmoid(0.5 (-20 cos(F(x), p) - t))`` at feature resolution (getPred, fewshot.py L156-170).

    Args:
        feats: ``N x C x h x w``; prototype: ``C`` or ``N x C``; thresholds: ``N`` (each image's ``t``).

    Returns:
        ``N x h x w`` in [0, 1].
    """
    return query_prior(feats, prototype, thresholds, SCALER, SLOPE)


def combine(probs: Sequence[torch.Tensor], weights: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """The two paths' ``N x h x w`` foreground probabilities -> ``N x H x W``: each up-sampled
    (bilinear, ``align_corners=True``; ``UpsampleGrid.up``), then ``sum_n w_n p_n / sum_n w_n``
    (fewshot.py L102-105; L229-235 in the alignment loss)."""
    ups = [UpsampleGrid(tuple(p.shape[-2:]), image_size, p.device, p.dtype).up(p[:, None])[:, 0] for p in probs]
    return (weights[0] * ups[0] + weights[1] * ups[1]) / weights.sum()


def foreground_mask(prob: torch.Tensor) -> torch.Tensor:
    """Where ``argmax([1 - p, p])`` is 1 (ties go to the background; fewshot.py L130-131, L210)."""
    return torch.stack([1 - prob, prob], dim=1).argmax(dim=1) == 1


def min_max_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``sigmoid((x - min) / (max - min))`` with min and max over each slice's ``C x h x w``
    (fewshot.py L139-140, where one call holds one slice). ``x``: ``N x C x h x w``."""
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    return torch.sigmoid((x - low) / (high - low))


def reconstruction_loss(reference: torch.Tensor, rebuilt: torch.Tensor) -> torch.Tensor:
    """``sum over slices of BCE(input=reference, target=rebuilt)``, the BCE a mean over the slice
    (``nn.BCELoss()(fts_norm, new_fts_norm)``, fewshot.py L141-142: the gradient flows through the
    *target*). Summing per-slice means gives each slice's prototype exactly its own gradient.

    Args:
        reference, rebuilt: ``N x C x h x w`` in (0, 1).
    """
    return F.binary_cross_entropy(reference, rebuilt, reduction="none").flatten(1).mean(dim=1).sum()


def refine_prototype(feats: torch.Tensor, prototype: torch.Tensor, thresholds: torch.Tensor, iters: int,
                     lr: float = REFINE_LR) -> torch.Tensor:
    """Test-time prototype refinement of one path (``updatePrototype``, fewshot.py L121-154), for
    ``N`` query slices at once: slice ``n`` owns row ``n`` of the parameter. Adam is elementwise and
    the loss a sum of per-slice terms, so this equals ``N`` separate runs (up to float rounding).

    Each of the ``iters`` steps: the foreground mask of the current prototype (argmax at feature
    resolution), ``F'`` = ``F`` with the masked cells replaced by the prototype, one Adam step on
    :func:`reconstruction_loss` of ``min_max_sigmoid(F)`` and ``min_max_sigmoid(F')``.

    Runs with autograd on detached copies, also when called under ``torch.inference_mode()`` or
    ``no_grad``; touches no model parameter.

    Args:
        feats: ``N x C x h x w``; prototype: ``C`` (the support's) or ``N x C``; thresholds: ``N``.
        iters: Adam steps (0 returns the prototype unchanged).

    Returns:
        ``N x C`` refined prototypes (detached).
    """
    n = feats.shape[0]
    with torch.inference_mode(False), torch.enable_grad():
        feats, thresholds = feats.detach().clone(), thresholds.detach().clone()  # normal tensors (not inference)
        proto = nn.Parameter(prototype.detach().expand(n, -1).clone())  # (N, C)
        optimizer = torch.optim.Adam([proto], lr=lr)
        reference = min_max_sigmoid(feats)  # fts_norm, L139
        for _ in range(iters):
            with torch.no_grad():
                fg = foreground_mask(foreground_probability(feats, proto, thresholds))[:, None]  # (N, 1, h, w)
            rebuilt = torch.where(fg, proto[:, :, None, None], feats)  # new_fts, L133-138
            loss = reconstruction_loss(reference, min_max_sigmoid(rebuilt))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return proto.detach()


def alignment_loss(query_feats: Sequence[torch.Tensor], query_prob: torch.Tensor,
                   supp_feats: Sequence[torch.Tensor], supp_masks: torch.Tensor, threshold: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """Q-Net's alignment loss (``alignLoss``, fewshot.py L206-248): the query segments the support.

    Args:
        query_feats: per path ``1 x C x h x w``; query_prob: ``1 x H x W`` combined foreground probability.
        supp_feats: per path ``S x C x h x w``; supp_masks: ``S x H x W`` in {0, 1}.
        threshold: ``(1,)`` the query's ``t``; weights: the paths' ``[alpha, 1 - alpha]``.

    Returns:
        ``sum_s NLL_s / S`` (unweighted NLL, L246); zero when no query pixel is foreground (L212, L218).
    """
    fg = foreground_mask(query_prob).to(query_prob.dtype)  # (1, H, W) at image resolution, L210-213
    if not bool(fg.any()):
        return query_prob.new_zeros(())
    n_shots = supp_masks.shape[0]
    probs = [foreground_probability(s, masked_average(q, fg)[0], threshold.expand(n_shots))  # (S, h, w) L223-228
             for q, s in zip(query_feats, supp_feats)]
    prob = combine(probs, weights, tuple(supp_masks.shape[-2:]))  # (S, H, W)
    pred = torch.stack([1 - prob, prob], dim=1)  # L236
    labels = support_labels(supp_masks)  # L239-241
    return sum(nll_loss(pred[s:s + 1], labels[s:s + 1]) / n_shots for s in range(n_shots))


class QNet(nn.Module):
    """Q-Net with ``models.qamp.QAMP``'s call signatures; draws nothing (``generator`` is accepted, unused).

    Reads ``backbone``, ``feature_dim``, ``qnet_alpha`` and ``qnet_refine_iters`` from ``config``;
    every other number is the authors' (constants above), so QAMP's keys do not apply. Refinement
    runs in eval mode only (the authors' ``train=False``): in ``forward`` and ``segment``.

    Args:
        config: ``ModelConfig``.
        image_size: ``(H, W)`` of the images.
    """

    def __init__(self, config: ModelConfig, image_size: tuple[int, int]):
        super().__init__()
        self.config = config
        self.image_size = tuple(image_size)
        self.encoder = QNetEncoder(config.backbone, config.feature_dim)

    def _support(self, feats: Sequence[torch.Tensor], masks: torch.Tensor) -> QNetSupport:
        """Per path ``S x C x h x w`` features, ``S x H x W`` masks -> prototypes (shot mean, fewshot.py L201)."""
        return QNetSupport(tuple(feats), masks, tuple(masked_average(f, masks).mean(dim=0) for f in feats))

    def _predict(self, support: QNetSupport, feats: Sequence[torch.Tensor],
                 thresholds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per path ``N x C x h x w`` query features and ``N`` thresholds -> ``pred N x 2 x H x W``,
        ``prior N x H x W`` (the combined foreground probability); refined in eval mode."""
        iters = 0 if self.training else self.config.qnet_refine_iters
        probs = []
        for f, proto in zip(feats, support.prototypes):
            if iters > 0:  # fewshot.py L92-99: per path, then re-predicted with the refined prototype
                proto = refine_prototype(f, proto, thresholds, iters)
            probs.append(foreground_probability(f, proto, thresholds))  # (N, h, w)
        prob = combine(probs, path_weights(self.config.qnet_alpha, probs[0]), self.image_size)
        return {"pred": torch.stack([1 - prob, prob], dim=1), "prior": prob}

    def forward(self, supp_imgs: torch.Tensor, supp_masks: torch.Tensor, qry_imgs: torch.Tensor,
                qry_labels: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        """One episode (support and query through the encoder in one batch, fewshot.py L52-54).

        Args:
            supp_imgs: ``1 x S x 3 x H x W``; supp_masks: ``1 x S x H x W`` in {0, 1};
            qry_imgs: ``1 x 3 x H x W``; qry_labels: ``1 x H x W`` int64 in {0, 1} (255 ignored) or None.

        Returns:
            ``pred`` ``1 x 2 x H x W`` probabilities [bg, fg]; ``prior`` ``1 x H x W`` (``pred[:, 1]``);
            ``monitors`` ``{"threshold": t}`` (the query's, 0-dim, detached); with labels also
            ``losses`` (unweighted 'query', 'align') and ``loss``.
        """
        check_episode(supp_imgs, qry_imgs, self.image_size)
        n_shots = supp_imgs.shape[1]
        *feats, t = self.encoder(torch.cat([supp_imgs[0], qry_imgs]))
        masks = supp_masks[0].to(feats[0].dtype)
        support = self._support([f[:n_shots] for f in feats], masks)
        query = [f[n_shots:] for f in feats]
        out = self._predict(support, query, t[n_shots:])
        result: dict[str, Any] = {"pred": out["pred"], "prior": out["prior"],
                                  "monitors": {"threshold": t[n_shots:].detach().mean()}}
        if qry_labels is not None:
            weights = path_weights(self.config.qnet_alpha, out["prior"])
            losses = {"query": nll_loss(out["pred"], qry_labels, QUERY_WEIGHTS),  # train.py L112-113
                      "align": alignment_loss(query, out["prior"], support.feats, masks, t[n_shots:], weights)}
            result["losses"] = losses
            result["loss"] = sum(LOSS_WEIGHTS[k] * v for k, v in losses.items())
        return result

    def encode_support(self, supp_imgs: torch.Tensor, supp_masks: torch.Tensor,
                       generator: Optional[torch.Generator] = None,
                       feats: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> QNetSupport:
        """Support features and prototypes (``1 x S x 3 x H x W``); ``feats``: a previous state's
        ``feats`` (both paths) when already computed (test.py caches them), the encoder is skipped then."""
        check_image_size(supp_imgs, self.image_size, "supp_imgs")
        if feats is None:
            *feats, _ = self.encoder(supp_imgs[0])
        return self._support(feats, supp_masks[0].to(feats[0].dtype))

    def segment(self, support: QNetSupport, qry_imgs: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """``N x 3 x H x W`` query slices -> ``pred N x 2 x H x W``, ``prior N x H x W`` (refined in eval mode)."""
        check_image_size(qry_imgs, self.image_size, "qry_imgs")
        *feats, t = self.encoder(qry_imgs)
        return self._predict(support, feats, t)
