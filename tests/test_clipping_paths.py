"""The clipping weights computed with numpy (CPU) and with torch (other devices) agree and both stay below C."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privfl.clients.clipping import CLIP_MARGIN, clipping_rule


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", ["flat", "psac", "autos"])
def test_numpy_and_torch_weights_agree_and_keep_the_strict_bound(rule, dtype):
    torch.manual_seed(0)
    norms = torch.cat([torch.logspace(-8, 10, 400, dtype=dtype), torch.zeros(1, dtype=dtype),
                       torch.rand(200, dtype=dtype) * 3])
    r = clipping_rule(rule)
    via_numpy = r.capped_weights(norms.numpy(), 1.3)
    via_torch = r.capped_weights(norms, 1.3)
    assert isinstance(via_numpy, np.ndarray) and via_numpy.dtype == norms.numpy().dtype
    assert via_torch.dtype == dtype
    # one rounding of a division against torch's reciprocal-then-product: within a few ulps
    eps = float(torch.finfo(dtype).eps)
    np.testing.assert_allclose(via_numpy, via_torch.numpy(), rtol=4 * eps, atol=0)
    for w in (torch.from_numpy(via_numpy), via_torch):
        assert bool(torch.all(norms.double() * w.double() < 1.3 * (1 - CLIP_MARGIN / 2)))
    assert torch.equal(r.weights(norms, 1.3), torch.from_numpy(via_numpy))  # the CPU path is numpy's


def test_weights_keep_a_low_precision_dtype_and_need_no_grad():
    norms = torch.rand(16, requires_grad=True).half()
    w = clipping_rule("psac").weights(norms, 1.0)
    assert w.dtype == torch.float16 and not w.requires_grad
