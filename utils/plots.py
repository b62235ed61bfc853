"""Figures of a run: the training loss curve and test overlays (PNG, written atomically).

Uses matplotlib's object API with the Agg canvas (no pyplot global state, no display needed).
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.io import atomic_write


def _save(fig: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(fig)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_loss_curve(history: Mapping[str, Sequence[float]], path: str | os.PathLike,
                    smooth: int = 50) -> None:
    """Plot every loss series of ``history`` (one value per step) against the step number.

    Args:
        history: name -> per-step values; ``'loss'`` (the weighted total) is drawn thicker.
        path: destination ``.png``.
        smooth: moving-average window in steps (the raw series is drawn faintly behind).
    """
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for name, values in history.items():
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            continue
        steps = np.arange(1, values.size + 1)
        line, = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
        window = min(smooth, max(1, values.size // 5))
        smoothed = _smooth(values, window)
        ax.plot(steps[steps.size - smoothed.size:], smoothed, color=line.get_color(),
                linewidth=2.0 if name == "loss" else 1.2, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    _save(fig, path)


def plot_overlay(path: str | os.PathLike, support_image: np.ndarray, support_mask: np.ndarray,
                 query_image: np.ndarray, ground_truth: np.ndarray, prediction: np.ndarray,
                 prior: np.ndarray | None, title: str = "") -> None:
    """One row of panels: support + mask, query, ground truth, prediction, QPG prior.

    Args:
        support_image, query_image: ``H x W`` float (any range; shown with per-image contrast).
        support_mask, ground_truth, prediction: ``H x W`` binary.
        prior: ``H x W`` QPG prior in [0, 1], or None (baselines without a prior).
    """
    panels = [("support + mask", support_image, support_mask, "tab:green"),
              ("query", query_image, None, None),
              ("ground truth", query_image, ground_truth, "tab:green"),
              ("prediction", query_image, prediction, "tab:red")]
    fig = Figure(figsize=(15, 3.4), dpi=80)
    for i, (name, image, mask, color) in enumerate(panels):
        ax = fig.add_subplot(1, 5, i + 1)
        ax.imshow(image, cmap="gray")
        if mask is not None and np.any(mask):
            ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors=color, linewidths=1.2)
            ax.imshow(np.ma.masked_where(~np.asarray(mask, dtype=bool), mask), cmap="autumn",
                      alpha=0.3, vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(1, 5, 5)
    if prior is None:
        ax.text(0.5, 0.5, "no prior\n(baseline)", ha="center", va="center")
    else:
        shown = ax.imshow(prior, cmap="viridis", vmin=0.0, vmax=1.0)
        fig.colorbar(shown, ax=ax, fraction=0.046)
    ax.set_title("QPG prior", fontsize=9)
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_validation_curve(points: Sequence[Mapping], history: Mapping[str, Sequence[float]],
                          path: str | os.PathLike, smooth: int = 50) -> None:
    """Validation Dice per class and their mean against the step (top), and the training-time
    collapse indicators (bottom): fraction of query pixels predicted foreground and the fraction of
    steps whose reverse terms ran (moving averages over ``smooth`` steps).

    Args:
        points: ``[{"step": k, "dice": {class name: Dice in [0, 1]}, "mean": Dice}, ...]``.
        history: per-step series; ``'fg_fraction'`` and ``'reverse_ran'`` are drawn when present.
        path: destination ``.png``.
    """
    fig = Figure(figsize=(8, 6.5), dpi=100)
    ax = fig.add_subplot(2, 1, 1)
    if points:
        steps = [p["step"] for p in points]
        for name in points[-1]["dice"]:
            ax.plot(steps, [100 * p["dice"].get(name, np.nan) for p in points], marker="o", markersize=3,
                    linewidth=1.0, label=name)
        ax.plot(steps, [100 * p["mean"] for p in points], color="black", linewidth=2.2, marker="o",
                markersize=4, label="mean")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_ylabel("validation Dice (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax2 = fig.add_subplot(2, 1, 2, sharex=ax)
    for name, label in (("fg_fraction", "query pixels predicted foreground"),
                        ("reverse_ran", "steps whose reverse terms ran")):
        values = np.asarray(history.get(name, []), dtype=np.float64)
        if values.size:
            smoothed = _smooth(values, min(smooth, max(1, values.size // 5)))
            ax2.plot(np.arange(1, values.size + 1)[values.size - smoothed.size:], smoothed, label=label)
    ax2.set_xlabel("step")
    ax2.set_ylabel("fraction (moving average)")
    ax2.set_ylim(-0.02, 1.02)
    ax2.grid(alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
