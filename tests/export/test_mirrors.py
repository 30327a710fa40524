"""The torch mirrors used in training and calibration equal the edge's numpy functions."""
import numpy as np
import pytest
import torch

from splitinfer.edge.selection import select_tokens
from splitinfer.export.tokens import fake_quantize_int8, select_tokens_mask
from splitinfer.protos.codec import dequantize_int8, quantize_int8


def _importance(rng, b, p, ties=False):
    x = rng.random((b, p)).astype(np.float32) ** 4
    if ties:
        x = np.round(x * 8) / 8 + 1e-3  # many exact ties
    return x / x.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("mass, budget", [(0.5, 64), (0.9, 16), (0.99, 8), (1.0, 64), (0.3, 1)])
def test_selection_parity(mass, budget, ties):
    rng = np.random.default_rng(int(mass * 100) + budget + ties)
    imp = _importance(rng, 64, 64, ties)
    mask = select_tokens_mask(torch.from_numpy(imp), mass, budget).numpy()
    for row, m in zip(imp, mask):
        np.testing.assert_array_equal(np.flatnonzero(m), select_tokens(row, mass, budget))


def test_selection_semantics():
    imp = np.array([0.0625, 0.5, 0.0625, 0.25, 0.125], np.float32)  # exact in binary
    np.testing.assert_array_equal(select_tokens(imp, 0.5, 5), [1])  # 0.5 alone covers half
    np.testing.assert_array_equal(select_tokens(imp, 0.8, 5), [1, 3, 4])
    np.testing.assert_array_equal(select_tokens(imp, 0.9, 5), [0, 1, 3, 4])  # tie 0/2 -> lower index
    np.testing.assert_array_equal(select_tokens(imp, 1.0, 2), [1, 3])  # budget caps
    with pytest.raises(ValueError, match="mass"):
        select_tokens(imp, 0.0, 3)
    with pytest.raises(ValueError, match="budget"):
        select_tokens(imp, 0.5, 0)
    with pytest.raises(ValueError, match="NaN"):
        select_tokens(np.array([np.nan, 1.0]), 0.5, 1)


def test_int8_quantization_parity():
    rng = np.random.default_rng(0)
    tokens = (rng.normal(size=(33, 128)) * rng.uniform(0.01, 30, size=(33, 1))).astype(np.float32)
    tokens[5] = 0.0
    tokens[7, :3] = [1.0, -1.0, 0.5]  # exact .5 steps exercise round-half-even
    q, s = quantize_int8(tokens)
    np.testing.assert_array_equal(fake_quantize_int8(torch.from_numpy(tokens)).numpy(), dequantize_int8(q, s))


@pytest.mark.parametrize("bits, group_size, scale_dtype", [
    (8, 0, "fp32"), (8, 0, "fp16"), (8, 16, "fp16"), (4, 0, "fp32"), (4, 8, "fp16"), (4, 32, "fp32"),
])
def test_low_bit_quantization_parity(bits, group_size, scale_dtype):
    from splitinfer.export.tokens import fake_quantize
    from splitinfer.protos.codec import dequantize, quantize

    rng = np.random.default_rng(bits + group_size)
    tokens = (rng.normal(size=(21, 64)) * rng.uniform(0.01, 30, size=(21, 1))).astype(np.float32)
    tokens[3] = 0.0
    q, s = quantize(tokens, bits, group_size, scale_dtype)
    mirrored = fake_quantize(torch.from_numpy(tokens), bits, group_size, scale_dtype).numpy()
    np.testing.assert_array_equal(mirrored, dequantize(q, s))
