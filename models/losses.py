"""Training losses of QAMP (docs/METHOD.md §4) and of the heads that share them (GMRD: ``descriptor_loss``).
Each returns one unweighted scalar."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from models import sampling
from models.qpg import query_prior
from models.sampling import UpsampleGrid

IGNORE_INDEX = 255  # label value excluded from the NLL terms


def nll_loss(probs: torch.Tensor, labels: torch.Tensor, class_weights: Optional[Sequence[float]] = None,
             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Weighted NLL on ``log(clamp(probs, eps, 1 - eps))`` (``eps`` = float32 machine epsilon).

    Args:
        probs: ``N x K x H x W`` class probabilities.
        labels: ``N x H x W`` int64 in ``[0, K)`` or ``ignore_index``.
        class_weights: ``K`` weights (query loss: ``[0.1, 1.0]``) or None (alignment loss).

    Returns:
        ``sum_x w[y_x] * -log p_x(y_x) / sum_x w[y_x]`` over non-ignored pixels.

    On the CPU ``F.nll_loss``; elsewhere :func:`weighted_nll` (``F.nll_loss`` on 2-D maps has no
    deterministic CUDA kernel; see ``models.sampling``).
    """
    eps = torch.finfo(torch.float32).eps
    log_probs = torch.log(torch.clamp(probs, eps, 1 - eps))
    weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=probs.dtype, device=probs.device)
    if sampling.torch_kernels(probs.device):
        return F.nll_loss(log_probs, labels, weight=weight, ignore_index=ignore_index)
    return weighted_nll(log_probs, labels, weight, ignore_index)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``F.cross_entropy`` (mean reduction) of ``N x K x H x W`` logits and ``N x H x W`` int64 labels.

    On the CPU ``F.cross_entropy`` itself; elsewhere ``log_softmax`` and :func:`weighted_nll`
    (deterministic on CUDA; equal up to float rounding). Used by the SSL-ALPNet head.
    """
    if sampling.torch_kernels(logits.device):
        return F.cross_entropy(logits, labels, weight=weight, ignore_index=ignore_index)
    return weighted_nll(F.log_softmax(logits, dim=1), labels, weight, ignore_index)


def weighted_nll(log_probs: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``F.nll_loss(log_probs, labels, weight, ignore_index=...)`` (mean reduction) as weighted sums:
    elementwise products and two full reductions, deterministic on CUDA; equal up to float rounding.

    Args:
        log_probs: ``N x K x H x W``; labels: ``N x H x W`` int64 in ``[0, K)`` or ``ignore_index``;
        weight: ``K`` class weights or None (all 1).

    Raises:
        ValueError: a label outside ``[0, K)`` that is not ``ignore_index``.
    """
    n_classes = log_probs.shape[1]
    classes = torch.arange(n_classes, device=labels.device).view(1, -1, 1, 1)
    picked = (labels[:, None] == classes).to(log_probs.dtype)  # (N, K, H, W) one-hot; ignored pixels all 0
    if not bool((picked.sum(dim=1) > 0).logical_or(labels == ignore_index).all()):
        raise ValueError(f"nll_loss: labels must be in [0, {n_classes}) or {ignore_index}, got values "
                         f"{sorted(set(labels.unique().tolist()) - set(range(n_classes)) - {ignore_index})}")
    weights = picked if weight is None else picked * weight.view(1, -1, 1, 1)
    return -(weights * log_probs).sum() / weights.sum()


def support_labels(masks: torch.Tensor) -> torch.Tensor:
    """``S x H x W`` int64 labels of support masks: 1 where 1, 0 where 0, 255 (ignored) elsewhere.

    The support targets of the baselines' alignment losses (ADNet fewshot_anom.py L168-170,
    SSL-ALPNet grid_proto_fewshot.py L222-225, background = ``1 - mask``).
    """
    labels = torch.full(masks.shape, IGNORE_INDEX, dtype=torch.long, device=masks.device)
    labels[masks == 1] = 1
    labels[masks == 0] = 0
    return labels


def _boundary(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Soft boundary of ``N x K x H x W`` maps in [0, 1]: ``maxpool(1 - x) - (1 - x)``."""
    inverted = 1 - x
    return F.max_pool2d(inverted, kernel, stride=1, padding=(kernel - 1) // 2) - inverted


def boundary_f1_loss(probs: torch.Tensor, labels: torch.Tensor, theta0: int = 3, theta: int = 5) -> torch.Tensor:
    """``mean over images and classes of (1 - BF1)`` between predicted and label boundaries.

    Boundaries use a ``theta0 x theta0`` max-pool; they are extended with a ``theta x theta``
    max-pool for the overlaps: ``P = sum(b_pred * ext(b_gt)) / sum(b_pred)``,
    ``R = sum(ext(b_pred) * b_gt) / sum(b_gt)``, ``BF1 = 2PR / (P + R)`` (1e-7 guards).

    Args:
        probs: ``N x K x H x W`` probabilities; labels: ``N x H x W`` int64 in ``[0, K)``.
    """
    n_classes = probs.shape[1]
    one_hot = F.one_hot(labels, n_classes).permute(0, 3, 1, 2).to(probs.dtype)
    gt_b, pred_b = _boundary(one_hot, theta0), _boundary(probs, theta0)
    gt_ext = F.max_pool2d(gt_b, theta, stride=1, padding=(theta - 1) // 2)
    pred_ext = F.max_pool2d(pred_b, theta, stride=1, padding=(theta - 1) // 2)
    precision = (pred_b * gt_ext).sum(dim=(2, 3)) / (pred_b.sum(dim=(2, 3)) + 1e-7)
    recall = (pred_ext * gt_b).sum(dim=(2, 3)) / (gt_b.sum(dim=(2, 3)) + 1e-7)
    bf1 = 2 * precision * recall / (precision + recall + 1e-7)
    return (1 - bf1).mean()


def regroup_by_origin(forward_set: torch.Tensor, reverse_set: torch.Tensor,
                      n_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Regroup one class's forward and reverse prototype sets by the image the vectors came from.

    Both sets are ``P x C`` and start with ``n_head`` vectors sampled from their *query* (PGQP);
    the rest comes from their *support*. In the reverse pass the roles are swapped, so

        support-derived = forward[n_head:] + reverse[:n_head]
        query-derived   = forward[:n_head] + reverse[n_head:]
    """
    support_derived = torch.cat([forward_set[n_head:], reverse_set[:n_head]])
    query_derived = torch.cat([forward_set[:n_head], reverse_set[n_head:]])
    return support_derived, query_derived


def prototype_consistency_loss(sup_fg: torch.Tensor, qry_fg: torch.Tensor,
                               sup_bg: torch.Tensor, qry_bg: torch.Tensor) -> torch.Tensor:
    """``2 - <d1,d2> - <b1,b2> + max(0, <d1,b1>) + max(0, <d2,b2>)`` on L2-normalised set means.

    ``d1, d2``: means of the support- / query-derived foreground sets (``P x C`` each);
    ``b1, b2``: the same for background.
    """
    d1, d2, b1, b2 = (F.normalize(s.mean(dim=0), dim=0) for s in (sup_fg, qry_fg, sup_bg, qry_bg))
    intra = 2 - (d1 @ d2) - (b1 @ b2)
    inter = (d1 @ b1).clamp(min=0) + (d2 @ b2).clamp(min=0)
    return intra + inter


def descriptor_loss(sup_fg: torch.Tensor, qry_fg: torch.Tensor, sup_bg: torch.Tensor, qry_bg: torch.Tensor,
                    n_pooled: int = 2) -> torch.Tensor:
    """GMRD's auxiliary descriptor loss (its models/fewshot_GMRD.py ``get_aux_loss``, L404-429, at 45ba5c2).

    Each set is ``P x C``: ``P - n_pooled`` learned descriptors followed by ``n_pooled`` masked
    averages (global, edge band); ``sup_*`` from the support, ``qry_*`` from the query (the reverse
    pass). With every row L2-normalised (``d1, d2, b1, b2``):

    * intra, per class: each learned support descriptor's best cosine among the learned query
      descriptors (``max_j <d1_i, d2_j>``, L410, L413) and the cosine of each masked-average pair
      (L411-412), averaged over the ``P`` values (L414-415); ``intra = 2 - fg - bg`` (L423);
    * inter: ``max(0, mean_ij <d1_i, b1_j>) + max(0, mean_ij <d2_i, b2_j>)`` over every pair (L425-427).

    Returns ``intra + inter`` (a scalar; GMRD weighs it 0.5, train.py L112).
    """
    def intra(sup: torch.Tensor, qry: torch.Tensor) -> torch.Tensor:
        best = torch.max(sup[:-n_pooled] @ qry[:-n_pooled].T, dim=1).values  # (P - n_pooled,)
        pooled = (sup[-n_pooled:] * qry[-n_pooled:]).sum(dim=1)  # (n_pooled,)
        return torch.cat([best, pooled]).mean()

    d1, d2, b1, b2 = (F.normalize(s, dim=-1) for s in (sup_fg, qry_fg, sup_bg, qry_bg))
    inter = (d1 @ b1.T).mean().clamp(min=0) + (d2 @ b2.T).mean().clamp(min=0)
    return 2 - intra(d1, d2) - intra(b1, b2) + inter


def prior_alignment_loss(query_feats: torch.Tensor, query_pred: torch.Tensor, supp_feats: torch.Tensor,
                         supp_masks: torch.Tensor, threshold: torch.Tensor, grid: UpsampleGrid, scaler: float,
                         temperature: float) -> torch.Tensor:
    """Reverse alignment in ADNet's style: the query, masked by its predicted foreground, segments the support.

    Used by QAMP when the support mask is empty (mask and prototype at image resolution, the
    threshold of the query image). The ADNet head has the authors' own form
    (``models.adnet.alignment_loss``: feature resolution, one learned threshold). Zero when the
    predicted query mask is empty.

    Args:
        query_feats: ``1 x C x h x w``; query_pred: ``1 x 2 x H x W`` probabilities.
        supp_feats: ``S x C x h x w``; supp_masks: ``S x H x W`` in {0, 1}.
        threshold: ``1`` threshold of the query image.
        grid: ``models.sampling.UpsampleGrid`` of the model.
    """
    pred_mask = (query_pred.argmax(dim=1) == 1).to(query_feats.dtype)  # (1, H, W)
    if not bool(pred_mask.any()):
        return query_feats.new_zeros(())
    prototype = grid.masked_average(query_feats, pred_mask)  # (1, C)
    n_shots = supp_feats.shape[0]
    prior = query_prior(supp_feats, prototype.expand(n_shots, -1), threshold.expand(n_shots), scaler, temperature)
    prior = grid.up(prior[:, None])  # (S, 1, H, W)
    return nll_loss(torch.cat([1 - prior, prior], dim=1), supp_masks.long())
