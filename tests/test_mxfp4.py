"""MXFP4: every code's value, nibble order, scale extremes, quantize rounding and round trips."""

from __future__ import annotations

import pytest
import torch

from runtime.mxfp4 import FP4_VALUES, dequantize, quantize

EXPECTED = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """[..., 32k] codes (0..15) → [..., k, 16] bytes, low nibble first."""
    c = codes.to(torch.uint8).unflatten(-1, (-1, 16, 2))
    return c[..., 0] | (c[..., 1] << 4)


def test_every_code_decodes_to_its_value_low_nibble_first():
    low = torch.arange(16)
    high = 15 - low
    blocks = (low | (high << 4)).to(torch.uint8).view(1, 16)  # one group
    scales = torch.tensor([127], dtype=torch.uint8)  # 2^0
    values = dequantize(blocks, scales)
    assert values.shape == (32,)
    assert values[0::2].tolist() == EXPECTED  # low nibbles come first
    assert values[1::2].tolist() == EXPECTED[::-1]
    # code 8 is negative zero, code 0 positive zero
    assert torch.signbit(values[16]) and not torch.signbit(values[0])
    assert list(FP4_VALUES) == EXPECTED


@pytest.mark.parametrize(("scale", "factor"), [(0, 2.0**-127), (127, 1.0), (128, 2.0), (254, 2.0**127)])
def test_scale_extremes(scale: int, factor: float):
    codes = torch.full((32,), 2)  # value 1.0
    codes[1] = 11  # value -1.5
    values = dequantize(_pack(codes), torch.tensor([scale], dtype=torch.uint8))
    assert values[0].item() == factor
    assert values[1].item() == -1.5 * factor


def test_dequantize_keeps_leading_dims_and_dtype():
    blocks = torch.randint(0, 256, (3, 5, 2, 16), dtype=torch.uint8)
    scales = torch.randint(100, 140, (3, 5, 2), dtype=torch.uint8)
    out = dequantize(blocks, scales, torch.bfloat16)
    assert out.shape == (3, 5, 64) and out.dtype == torch.bfloat16
    # group 1 of row (2, 4) uses its own scale
    ref = torch.tensor(EXPECTED)[torch.stack((blocks[2, 4, 1] & 15, blocks[2, 4, 1] >> 4), -1)
                                 .flatten().long()] * 2.0 ** (scales[2, 4, 1].item() - 127)
    assert torch.equal(out[2, 4, 32:].float(), ref)


def test_dequantize_rejects_wrong_types_and_shapes():
    with pytest.raises(TypeError):
        dequantize(torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError):
        dequantize(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))


def _grid_values(groups: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (groups, 32), generator=g)
    scales = torch.randint(110, 140, (groups, 1), generator=g).to(torch.uint8)
    return dequantize(_pack(codes), scales)


def test_values_on_the_grid_round_trip_exactly():
    x = _grid_values(64, seed=1)
    blocks, scales = quantize(x)
    assert torch.equal(dequantize(blocks, scales), x)
    # signs survive, including on zeros
    assert torch.equal(torch.signbit(dequantize(blocks, scales)), torch.signbit(x))


def test_groups_holding_a_six_round_trip_bit_exactly():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (40, 32), generator=g)
    codes[:, 5] = 7  # each group's maximum is at the top of the grid
    codes[::2, 5] = 15
    blocks = _pack(codes)
    scales = torch.randint(100, 150, (40, 1), generator=g).to(torch.uint8)
    b2, s2 = quantize(dequantize(blocks, scales))
    assert torch.equal(b2, blocks) and torch.equal(s2, scales)


def test_quantize_picks_the_nearest_grid_value_with_the_smallest_scale():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 64, generator=g) * torch.logspace(-3, 3, 50).unsqueeze(1)
    blocks, scales = quantize(x)
    assert blocks.shape == (50, 2, 16) and scales.shape == (50, 2)
    q = dequantize(blocks, scales).view(50, 2, 32)
    groups = x.view(50, 2, 32)
    factor = torch.exp2(scales.float() - 127).unsqueeze(-1)  # [50, 2, 1]
    amax = groups.abs().amax(-1, keepdim=True)
    assert (amax <= 6 * factor).all()  # the scale fits the group…
    assert (amax > 3 * factor).all()  # …and is the smallest that does
    grid = torch.tensor(EXPECTED).view(1, 1, 1, 16) * factor.unsqueeze(-1)  # [50, 2, 1, 16]
    best = (groups.unsqueeze(-1) - grid).abs().amin(-1)
    assert torch.allclose((groups - q).abs(), best, rtol=0, atol=1e-12)
    # the error is at most half a grid step (steps are 0.5, 1, 2 in units of the scale)
    m = torch.maximum(q.abs(), groups.abs())
    step = torch.where(m <= 2 * factor, 0.5, torch.where(m <= 4 * factor, 1.0, 2.0))
    assert ((groups - q).abs() <= step * factor / 2).all()


def test_ties_round_to_the_even_code():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, 6.0] + [0.0] * 22)
    q = dequantize(*quantize(x))
    assert q[:10].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -2.0, 6.0]


def test_all_zero_groups():
    x = torch.zeros(3, 64)
    x[1, 40] = 3.0  # row 1's second group is not zero; its first still is
    blocks, scales = quantize(x)
    assert (blocks[0] == 0).all() and (blocks[1, 0] == 0).all()
    assert torch.equal(dequantize(blocks, scales), x)
    assert not torch.isnan(dequantize(blocks, scales)).any()


def test_quantize_rejects_ragged_rows():
    with pytest.raises(ValueError):
        quantize(torch.zeros(4, 40))
