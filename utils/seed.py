"""Capture and restore of the global RNG states, for exact resume.

The project draws its randomness from explicit generators (``numpy.random.Generator`` per episode,
``torch.Generator`` for prototype sampling and dropout) seeded from the run's seed. Snapshots also
save the global states (torch CPU, torch CUDA when the run uses CUDA, numpy, python) and a resumed
run restores them, so that any code that still draws from a global stream (a library, a torch
kernel) continues exactly too.

Across devices (a snapshot read on another machine): every state is restored from CPU tensors
whatever ``map_location`` put them on; the CUDA states are restored only when the resumed run uses
CUDA, for the GPUs it sees (a snapshot of 8 GPUs restored with 1 visible: ``cuda:0`` only); what
was not restored is returned as notes for the run's log. Nothing in this project draws from
torch's global CUDA streams, so those notes never change its numbers.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def _bytes(state: Any) -> torch.Tensor:
    """A saved RNG state as the CPU ``ByteTensor`` that every ``set_state`` requires."""
    return torch.as_tensor(state).to(device="cpu", dtype=torch.uint8)


def capture_rng_state(cuda: bool = False) -> dict[str, Any]:
    """The global RNG states (torch CPU, numpy, python; torch CUDA of every visible GPU when ``cuda``)
    as plain tensors / lists.

    ``cuda`` is whether the run uses CUDA: a CPU run on a GPU host never initialises CUDA here.
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
    if cuda:
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], cuda: bool = False) -> list[str]:
    """Restore what :func:`capture_rng_state` returned; ``cuda``: whether this run uses CUDA.

    Returns notes on the streams that were not restored (empty when everything was): CUDA states
    saved by a run that used more GPUs than are visible now (the first ones are restored), CUDA
    states in the snapshot of a run that does not use CUDA now (ignored), none saved for a run
    that uses CUDA now (the CUDA streams keep their seeding).
    """
    torch.set_rng_state(_bytes(state["torch"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].cpu().numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = [_bytes(s) for s in state.get("cuda", [])]
    if not cuda:
        return [f"torch's CUDA random states of {len(saved)} GPU(s) in the snapshot are not restored "
                "(this run does not use CUDA)"] if saved else []
    if not saved:
        return ["the snapshot holds no CUDA random states (written by a run without CUDA): torch's CUDA "
                "streams keep their seeding from the run's seed"]
    visible = torch.cuda.device_count()
    for index, gpu_state in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(gpu_state, index)
    if len(saved) > visible:
        return [f"the snapshot holds torch's CUDA random states of {len(saved)} GPUs and {visible} are visible: "
                f"restored for cuda:0..{visible - 1}, the others dropped"]
    return []


def restore_generator(generator: torch.Generator, state: Any) -> bool:
    """``generator.set_state(state)`` when ``state`` is a state of the same kind of generator.

    A CPU generator's state is 5056 bytes, a CUDA generator's 16; ``set_state`` refuses the other
    kind. Returns False, leaving ``generator`` as it is, for a state of another kind.
    """
    state = _bytes(state)
    if state.numel() != generator.get_state().numel():
        return False
    generator.set_state(state)
    return True
