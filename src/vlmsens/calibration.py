"""ModelOpt's max calibration without a host round-trip per quantizer and batch.

ModelOpt's ``MaxCalibrator.collect`` checks every collected amax for NaN, inf and negative values
with three Python asserts. Each assert reads a GPU boolean back to the host, so every quantizer of
every calibration forward (about 560 in a full-size cell: an input and a weight quantizer per
linear layer) waits three times for the GPU to drain, and the host never runs ahead of the GPU.

``DeferredCheckMaxCalibrator`` computes the same running max, keeps the same checks on the device,
and reads them once, when ModelOpt asks for the calibrated amax. It subclasses ModelOpt's
calibrator type, which ``QuantizerAttributeConfig.calibrator`` accepts as a constructor; the cell
puts it on each quantizer before the quantizer first collects (``install``), so the formats'
configurations, and the recipes written from them, stay ModelOpt's own.
"""

from __future__ import annotations

import functools


@functools.cache
def calibrator_class():
    """The calibrator class (built on first use: ModelOpt and torch load only where a cell runs)."""
    import torch
    from modelopt.torch.quantization import utils as quant_utils
    from modelopt.torch.quantization.calib import MaxCalibrator

    class DeferredCheckMaxCalibrator(MaxCalibrator):
        """MaxCalibrator whose sanity checks stay on the device until the amax is read."""

        def __init__(self, num_bits=8, axis=None, unsigned=False, track_amax=False):
            super().__init__(num_bits, axis, unsigned, track_amax)
            self._invalid = None

        @torch.no_grad()
        def collect(self, x):
            reduce_axis = quant_utils.convert_quantization_axis_to_reduce_axis(x, self._axis)
            local_amax = quant_utils.reduce_amax(x, axis=reduce_axis).detach()
            if x.device.type == "meta":
                self._calib_amax = local_amax
                return
            invalid = ~torch.isfinite(local_amax).all() | (local_amax < 0).any()
            self._invalid = invalid if self._invalid is None else self._invalid | invalid
            if self._calib_amax is None:
                self._calib_amax = local_amax
            else:
                if local_amax.shape != self._calib_amax.shape:
                    raise RuntimeError("amax shape changed!")
                self._calib_amax = torch.max(self._calib_amax, local_amax)
            if self._track_amax:
                self._amaxs.append(local_amax.cpu().numpy())

        def compute_amax(self):
            if self._invalid is not None and bool(self._invalid):
                raise ValueError("calibration collected NaN, inf or negative amax values (the model's activations "
                                 "or weights hold NaN or inf)")
            return self._calib_amax

        def reset(self):
            super().reset()
            self._invalid = None

    return DeferredCheckMaxCalibrator


def install(model) -> int:
    """Give every quantizer that still has ModelOpt's stock max calibrator the deferred-check one,
    with the state it collected so far; returns how many were replaced."""
    from modelopt.torch.quantization.calib import MaxCalibrator
    from modelopt.torch.quantization.nn import TensorQuantizer

    deferred = calibrator_class()
    replaced = 0
    for module in model.modules():
        if isinstance(module, TensorQuantizer) and type(getattr(module, "_calibrator", None)) is MaxCalibrator:
            stock = module._calibrator
            calibrator = deferred(stock._num_bits, stock._axis, stock._unsigned, stock._track_amax)
            calibrator._calib_amax = stock._calib_amax
            module._calibrator = calibrator
            replaced += 1
    return replaced
