"""Mixed precision (config key ``amp``): autocast for the encoder, a GradScaler for fp16.

``amp`` is ``'off'`` (default: float32 everywhere, the exact-reproduction setting), ``'bf16'`` or
``'fp16'``. Mixed precision is meant for CUDA; ``bf16`` also runs on a CPU (slowly on most CPUs:
it exists here so that the code path is tested without a GPU); ``fp16`` on a CPU is refused.

Where the lower precision applies, and where float32 is kept
-----------------------------------------------------------
* **Encoder** (ResNet-50/101 layers 1-4, the 1x1 reduction and the threshold head; about 80 % of
  the CPU time of a step at 256 px: 10.0 of 12.3 s, bench/results/train_step.json): its
  ``forward`` runs under ``torch.autocast(dtype)``, so convolutions and matmuls run in bf16 / fp16
  (other ops follow autocast's own per-op rules). Its two outputs (features ``N x C x h x w`` and
  thresholds ``N``) are cast back to **float32** before anything else sees them.
* **Everything after the encoder stays float32** (autocast is not active there):
  - masked average pooling / the upsampling algebra (``models.sampling.UpsampleGrid``): sums over
    up to 65 536 positions, where bf16's 8-bit mantissa would lose the small terms;
  - the QPG prior (``models.qpg``): ``sigmoid(0.5 * (-20 * cos - t))`` amplifies the cosine by 10, so
    a bf16 rounding of the cosine (~4e-3) would move the prior by ~1e-2 and flip positions across
    ``tau_fg`` / ``tau_bg``;
  - prototype sampling (MGSP fill maps, edge bands, PGQP ``prior > tau`` candidates,
    ``models.mgsp`` / ``models.pgqp``): which positions are candidates is a threshold decision, so
    the same seed draws the same prototypes as a float32 run whenever the encoder features agree;
  - cosine maps, the similarity decoders, softmax and every loss (NLL with class weights, boundary
    F1, reverse alignment, prototype consistency): log-probabilities and ratios of sums.
* **fp16** only: ``torch.amp.GradScaler`` scales the loss before backward, unscales the gradients
  before the SGD step, skips steps with inf/NaN gradients and adapts the scale; its state is saved
  in snapshots (key ``'amp_scaler'``) so that a resumed fp16 run continues exactly.

Use::

    amp = Amp(config["amp"], device).apply(model)   # wraps model.encoder.forward
    ...
    amp.backward_step(loss, optimizer)              # (scaled) backward, (unscale +) step, update
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn

AMP_MODES = ("off", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(mode: str, device: torch.device) -> None:
    """Raise ``ValueError`` for an unknown mode or fp16 on a CPU."""
    if mode not in AMP_MODES:
        raise ValueError(f"amp={mode!r} is unknown: expected one of {list(AMP_MODES)}")
    if mode == "fp16" and device.type != "cuda":
        raise ValueError(f"amp='fp16' needs CUDA (device is {device}): use amp='off' on a CPU "
                         f"(or amp='bf16', which runs on a CPU but is meant for CUDA)")


class _AutocastForward:
    """``forward`` replacement: the original under autocast, tensor outputs cast back to float32."""

    def __init__(self, forward: Callable, device_type: str, dtype: torch.dtype) -> None:
        self.forward, self.device_type, self.dtype = forward, device_type, dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            out = self.forward(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out.float()
        return type(out)(o.float() if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out)


class Amp:
    """Mixed-precision policy of one run.

    Args:
        mode: ``'off'``, ``'bf16'`` or ``'fp16'``.
        device: the run's device.

    Raises:
        ValueError: see :func:`check_amp`.
    """

    def __init__(self, mode: str, device: torch.device | str) -> None:
        self.device = torch.device(device)
        check_amp(mode, self.device)
        self.mode = mode
        self.enabled = mode != "off"
        self.dtype = DTYPES.get(mode, torch.float32)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=mode == "fp16")

    def autocast(self):
        """The autocast context of this policy (a no-op context when ``amp='off'``)."""
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.enabled)

    def apply(self, model: nn.Module, module_name: str = "encoder") -> "Amp":
        """Run ``model.<module_name>.forward`` under autocast with float32 outputs (see module doc).

        The wrapper is an instance attribute: parameters, ``state_dict`` and snapshots are unchanged.
        Returns ``self`` (``amp = Amp(...).apply(model)``).
        """
        if self.enabled:
            module = getattr(model, module_name)
            original = module.forward
            if isinstance(original, _AutocastForward):
                original = original.forward
            module.forward = _AutocastForward(original, self.device.type, self.dtype)
        return self

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      before_step: Optional[Callable[[], None]] = None) -> None:
        """``loss.backward()``, ``before_step()`` (e.g. the DDP gradient all-reduce), ``optimizer.step()``.

        fp16: the loss is scaled before backward; the step unscales, skips on inf/NaN gradients and
        updates the scale. With the scaler off this is exactly backward + step.
        """
        self.scaler.scale(loss).backward()
        if before_step is not None:
            before_step()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The GradScaler state (empty unless fp16)."""
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)
