"""Capture and restore of the global RNG states, for exact resume.

The project draws its randomness from explicit generators (``numpy.random.Generator`` per episode,
``torch.Generator`` for prototype sampling and dropout) seeded from the run's seed. Snapshots also
save the global states (torch CPU / CUDA, numpy, python) and a resumed run restores them, so that any
code that still draws from a global stream (a library, a torch kernel) continues exactly too.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU, torch CUDA if present, numpy, python) as plain tensors / lists.

    Everything is stored as tensors, ints and lists so that ``torch.load(..., weights_only=True)``
    reads it back.
    """
    np_state = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` returned (CUDA states only when CUDA is present)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
