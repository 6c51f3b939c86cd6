"""The deferred-check max calibrator: ModelOpt's amax, without reading the GPU back per quantizer."""

from __future__ import annotations

import pytest
import torch
from modelopt.torch.quantization.calib import MaxCalibrator

from vlmsens.calibration import calibrator_class

DeferredCheckMaxCalibrator = calibrator_class()


def _collect(calibrator, batches):
    for x in batches:
        calibrator.collect(x)
    return calibrator.compute_amax()


@pytest.mark.parametrize("axis", [None, 0])
def test_same_amax_as_modelopts_calibrator(axis):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(6, 5, generator=g) * s for s in (1.0, 3.0, 0.5)]
    assert torch.equal(_collect(MaxCalibrator(8, axis), batches), _collect(DeferredCheckMaxCalibrator(8, axis), batches))


def test_collect_never_reads_a_tensor_back(monkeypatch):
    """Every host read of a tensor goes through bool()/item(): none may happen while collecting."""
    calibrator = DeferredCheckMaxCalibrator(8, None)

    def forbidden(*_):
        raise AssertionError("collect read a tensor back to the host")

    x = torch.randn(4, 4)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "__bool__", forbidden)
        m.setattr(torch.Tensor, "item", forbidden)
        calibrator.collect(x)
        calibrator.collect(2 * x)
    assert torch.equal(calibrator.compute_amax(), (2 * x).abs().max())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_invalid_values_still_fail_when_the_amax_is_read(bad):
    calibrator = DeferredCheckMaxCalibrator(8, None)
    calibrator.collect(torch.ones(3))
    calibrator.collect(torch.tensor([1.0, bad]))
    with pytest.raises(ValueError, match="NaN, inf or negative"):
        calibrator.compute_amax()
    calibrator.reset()
    calibrator.collect(torch.ones(3))
    assert calibrator.compute_amax() == 1.0
