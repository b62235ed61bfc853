"""Mixed precision (config key ``amp``): autocast for the encoder, a GradScaler for fp16.

``amp`` is ``'off'`` (default: float32 everywhere, the exact-reproduction setting), ``'bf16'`` or
``'fp16'``. Mixed precision is meant for CUDA; ``bf16`` also runs on a CPU (slowly on most CPUs:
it exists here so that the code path is tested without a GPU); ``fp16`` on a CPU is refused.

What the modes are
------------------
* ``'off'``: IEEE float32 everywhere, TF32 included: on CUDA a run sets
  ``torch.backends.cudnn.allow_tf32`` and ``torch.backends.cuda.matmul.allow_tf32`` to False
  (:func:`disable_tf32`). cuDNN convolutions default to TF32 on Ampere and later GPUs (float16's
  11-bit mantissa), which would make ``'off'`` a reduced-precision run.
* ``'bf16'``: the encoder's convolutions and matmuls in bfloat16 (8-bit mantissa, float32's exponent
  range: no overflow, hence no loss scaling); everything after the encoder in float32.
* ``'fp16'``: the encoder in float16 (11-bit mantissa, 5-bit exponent: values beyond 65504 overflow
  to inf, gradients below ~6e-8 flush to zero), hence a GradScaler for the gradients. An overflow,
  in the backward *or in the forward* (inf activations make the loss inf or NaN), skips the step
  (see :meth:`Amp.backward_step`); ``train.py`` then skips the learning-rate schedule step too and
  logs it. The scale halves at each skip; forward overflows are not cured by it, so
  ``MAX_SKIPPED_IN_A_ROW`` skipped steps in a row stop the run with a ``FloatingPointError``.

The float32 parts stay IEEE float32 in every mode (TF32 is off for all of them on CUDA).

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
    taken = amp.backward_step(loss, optimizer)      # (scaled) backward, (unscale +) step, update
    if taken:                                       # fp16: False when the GradScaler skipped the step
        scheduler.step()
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn

AMP_MODES = ("off", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 steps skipped in a row before the run stops: the scale has then fallen from 2^16 to 2^-9, so
# what still overflows is the float16 forward (or a diverged run), which no loss scale cures.
MAX_SKIPPED_IN_A_ROW = 25


def disable_tf32() -> None:
    """IEEE float32 for cuDNN convolutions and cuBLAS matmuls (process-wide torch switches).

    Through the switches the torch documentation names (``torch.backends.cudnn.allow_tf32``,
    ``torch.backends.cuda.matmul.allow_tf32``); in torch 2.14 they set the per-backend
    ``fp32_precision`` flags consistently (conv / rnn / matmul). Only CUDA reads them.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


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
    """Mixed-precision policy of one run. On a CUDA device, constructing it turns TF32 off
    (:func:`disable_tf32`: the float32 parts of every mode are IEEE float32).

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
        self.skipped_steps = 0  # steps the GradScaler skipped (fp16), in all and in a row
        self.skipped_in_a_row = 0
        if self.device.type == "cuda":
            disable_tf32()

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
                      before_step: Optional[Callable[[], None]] = None) -> bool:
        """``loss.backward()``, ``before_step()`` (e.g. the DDP gradient all-reduce), ``optimizer.step()``.

        fp16: the loss is scaled before backward; the step unscales, skips on inf/NaN gradients and
        updates the scale. A non-finite loss (a float16 overflow in the forward) is skipped too: its
        gradients are set to NaN before ``before_step`` (a NaN loss can back-propagate finite
        gradients), so under torchrun every rank sees the NaN after the all-reduce and skips alike.
        With the scaler off this is exactly backward + step.

        Returns:
            Whether the optimizer stepped: always with the scaler off; with fp16, False when the
            GradScaler skipped the step, seen as its scale falling in ``update()`` (``GradScaler.update``'s
            documented rule: the scale is multiplied by ``backoff_factor`` when a step was skipped and
            only grows otherwise), so that a learning-rate schedule can follow the steps taken.

        Raises:
            FloatingPointError: ``MAX_SKIPPED_IN_A_ROW`` fp16 steps skipped in a row.
        """
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled() and not bool(torch.isfinite(loss)):
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.grad.fill_(float("nan"))
        if before_step is not None:
            before_step()
        if not self.scaler.is_enabled():
            self.scaler.step(optimizer)  # optimizer.step()
            self.scaler.update()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        taken = self.scaler.get_scale() >= scale
        self.skipped_steps += not taken
        self.skipped_in_a_row = 0 if taken else self.skipped_in_a_row + 1
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise FloatingPointError(
                f"amp='fp16': {self.skipped_in_a_row} steps in a row skipped by the GradScaler (inf/NaN "
                f"gradients or loss; last loss {loss.item()}, scale now {self.scaler.get_scale():g}): the float16 "
                "forward overflows (activations beyond 65504) or the run diverged; use amp='bf16' (float32's range) "
                "or amp='off'")
        return taken

    def state_dict(self) -> dict[str, Any]:
        """The GradScaler state (empty unless fp16)."""
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)
