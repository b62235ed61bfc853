"""Segment query scans chunk by chunk with the FSMIS protocol; shared by ``test.py`` and the
validation curve of ``train.py``.

``tds`` is a ``dataloaders.eval_dataset.EvalDataset`` (support scan, query scans, chunks, and the
resampling to the model grid); ``model`` has ``encode_support`` / ``segment`` (QAMP or a baseline
head: ADNet, ALPNet), or is None for the copy-support baseline. Scans stay on their native grid: the model sees
``image_size`` slices and its class probabilities are resampled back (bilinear, then argmax), so
every score and file is on the native grid.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from utils.metrics import Overlap, overlap
from utils.resample import resize_probabilities


@torch.inference_mode()
def predict_scan(model, tds, scan, class_id: int, batch_size: int, device: torch.device,
                 generator: torch.Generator | None,
                 support_feats: dict[int, torch.Tensor] | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Segment class ``class_id`` in one query scan, chunk by chunk.

    ``support_feats`` caches the encoder features of support slices by slice index: the support scan
    is the same for every query scan and class of a run, so each support slice goes through the
    encoder once per run (prototypes are still drawn per chunk, so the numbers do not change).

    Returns:
        ``(pred, prior, support_of)`` on the scan's native grid: ``pred`` uint8 (Z, H, W) {0, 1};
        ``prior`` float32 (Z, H, W) QPG prior in [0, 1] (None for copy_support and for models whose
        ``segment`` returns no ``'prior'``, e.g. ALPNet); ``support_of``
        int (Z,) the support slice used for each query slice, -1 where the slice was not segmented.
    """
    depth, height, width = scan.image.shape
    pred = np.zeros(scan.image.shape, dtype=np.uint8)
    prior = None  # allocated at the first 'prior' the model returns
    support_of = np.full(depth, -1, dtype=np.int64)
    for chunk, support_z in zip(tds.query_chunks(scan, class_id), tds.support_slices(class_id)):
        chunk = np.asarray(chunk, dtype=np.int64)
        if chunk.size == 0:
            continue
        support_of[chunk] = support_z
        support_mask = tds.support.label[support_z] == class_id  # (H, W) native
        if model is None:  # copy_support: the support mask pasted onto every slice of the chunk
            pred[chunk] = support_mask.astype(np.uint8)
            continue
        supp_img = tds.model_images(tds.support.image[[support_z]]).unsqueeze(0).to(device)  # (1, 1, 3, S, S)
        supp_mask = tds.model_masks(support_mask[None]).unsqueeze(0).to(device)  # (1, 1, S, S)
        cached = None if support_feats is None else support_feats.get(int(support_z))
        state = model.encode_support(supp_img, supp_mask, generator=generator, feats=cached)
        if support_feats is not None:
            support_feats[int(support_z)] = state.feats  # (1, C, h, w)
        for start in range(0, chunk.size, batch_size):
            zs = chunk[start:start + batch_size]
            out = model.segment(state, tds.model_images(scan.image[zs]).to(device), generator=generator)
            probs = resize_probabilities(out["pred"], (height, width))  # (N, 2, H, W)
            pred[zs] = probs.argmax(dim=1).to(torch.uint8).cpu().numpy()
            if "prior" in out:
                if prior is None:
                    prior = np.zeros(scan.image.shape, dtype=np.float32)
                prior[zs] = resize_probabilities(out["prior"], (height, width)).float().cpu().numpy()
    return pred, prior, support_of


def score_queries(model, tds, classes: Sequence[int], batch_size: int, device: torch.device,
                  generator_for: Callable[[int], torch.Generator | None]) -> dict[int, list[Overlap]]:
    """3D overlap of every query scan of ``tds`` for each class (the validation curve's numbers).

    Args:
        generator_for: class id -> the generator of that class (e.g. ``make_generator(seed, c)``).
    Returns:
        class id -> one :class:`utils.metrics.Overlap` per query scan (``.dice`` in [0, 1]; ``tp + fp``
        is the number of voxels predicted foreground, 0 for an all-background prediction).
    """
    feats: dict[int, torch.Tensor] = {}
    scores: dict[int, list[Overlap]] = {}
    for class_id in classes:
        generator = generator_for(class_id)
        scores[class_id] = []
        for scan in tds.queries:
            pred, _, support_of = predict_scan(model, tds, scan, class_id, batch_size, device, generator, feats)
            evaluated = support_of >= 0
            scores[class_id].append(overlap(pred[evaluated], scan.label[evaluated] == class_id))
    return scores
