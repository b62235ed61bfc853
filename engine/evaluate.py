"""Segment query scans chunk by chunk with the FSMIS protocol: :func:`segment_chunks` is the one
support-chunk loop, shared by ``test.py`` / the validation curve of ``train.py`` (:func:`predict_scan`)
and ``predict.py`` (``segment``).

``tds`` is a ``dataloaders.eval_dataset.EvalDataset`` (support scan, query scans, chunks, and the
resampling to the model grid); ``model`` has ``encode_support`` / ``segment`` (QAMP or a baseline
head: ADNet, ALPNet, Q-Net, ...), or is None for the copy-support baseline. Scans stay on their native grid: the model sees
``image_size`` slices and its class probabilities are resampled back (bilinear, then argmax), so
every score and file is on the native grid.

Everything runs under ``torch.inference_mode()``. A model that optimises at test time (Q-Net's
prototype refinement, ``models.qnet.refine_prototype``) does so inside ``segment`` under
``torch.inference_mode(False)`` and ``enable_grad`` on detached copies of its inputs, so the
evaluation stays in inference mode for every other model.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from utils.metrics import Overlap, overlap
from utils.resample import resize_probabilities


def segment_chunks(model, chunks: Iterable[tuple[int, np.ndarray]],
                   support_input: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                   query_input: Callable[[np.ndarray], torch.Tensor], batch_size: int, device: torch.device,
                   generator: torch.Generator | None, support_feats: dict[int, torch.Tensor] | None = None
                   ) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """The model's output for every query slice, chunk by chunk: each chunk is segmented against its
    support slice; call it under ``torch.inference_mode()``.

    Per chunk the support slice goes through ``model.encode_support`` (its encoder features cached in
    ``support_feats`` by slice index when given: the support scan is the same for every query and
    class of a run, so each support slice meets the encoder once; prototypes are still drawn per
    chunk, so the numbers do not change), then the chunk's query slices go through ``model.segment``
    in batches of ``batch_size``. Empty chunks are skipped.

    Args:
        chunks: ``(support slice z, query slice indices int (N,))`` pairs, in order.
        support_input: support slice z -> ``(image float32 (1, 1, 3, S, S), mask float32 (1, 1, S, S))``
            on the model grid.
        query_input: query slice indices (n,) -> float32 ``(n, 3, S, S)`` on the model grid.
        generator: prototype sampling (``models.make_generator(seed, class)``); None for models without.
    Yields:
        ``(zs, out)``: the query slice indices of one batch and the model's output dict for them
        (``out['pred']`` (n, 2, S, S) class probabilities; QAMP and ADNet also ``out['prior']``
        (n, S, S), the QPG prior / ADNet's foreground probability; ALPNet has none).
    """
    for support_z, chunk in chunks:
        if chunk.size == 0:
            continue
        supp_img, supp_mask = support_input(support_z)
        cached = None if support_feats is None else support_feats.get(int(support_z))
        state = model.encode_support(supp_img.to(device), supp_mask.to(device), generator=generator, feats=cached)
        if support_feats is not None:
            support_feats[int(support_z)] = state.feats  # (1, C, h, w); Q-Net: a tuple, one per path
        for start in range(0, chunk.size, batch_size):
            zs = chunk[start:start + batch_size]
            yield zs, model.segment(state, query_input(zs).to(device), generator=generator)


@torch.inference_mode()
def predict_scan(model, tds, scan, class_id: int, batch_size: int, device: torch.device,
                 generator: torch.Generator | None,
                 support_feats: dict[int, torch.Tensor] | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Segment class ``class_id`` in one query scan, chunk by chunk (:func:`segment_chunks` with the
    chunks and support slices of ``tds``; ``support_feats``: its support-feature cache).

    Returns:
        ``(pred, prior, support_of)`` on the scan's native grid: ``pred`` uint8 (Z, H, W) {0, 1};
        ``prior`` float32 (Z, H, W) QPG prior in [0, 1] (None for copy_support and models without a
        prior, ALPNet); ``support_of``
        int (Z,) the support slice used for each query slice, -1 where the slice was not segmented.
    """
    depth, height, width = scan.image.shape
    pred = np.zeros(scan.image.shape, dtype=np.uint8)
    prior = None
    support_of = np.full(depth, -1, dtype=np.int64)
    chunks = [(int(z), np.asarray(chunk, dtype=np.int64))
              for chunk, z in zip(tds.query_chunks(scan, class_id), tds.support_slices(class_id))]
    for support_z, chunk in chunks:
        support_of[chunk] = support_z
        if model is None:  # copy_support: the support mask pasted onto every slice of the chunk
            pred[chunk] = (tds.support.label[support_z] == class_id).astype(np.uint8)
    if model is None:
        return pred, prior, support_of

    def support_input(z: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = tds.support.label[z] == class_id  # (H, W) native
        return (tds.model_images(tds.support.image[[z]]).unsqueeze(0),  # (1, 1, 3, S, S)
                tds.model_masks(mask[None]).unsqueeze(0))  # (1, 1, S, S)

    for zs, out in segment_chunks(model, chunks, support_input, lambda zs: tds.model_images(scan.image[zs]),
                                  batch_size, device, generator, support_feats):
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
