"""The YaRN rotary table, computed once per model (DESIGN §3).

inv_freq_i = θ^(−2i/d). YaRN blends extrapolated (ω) and interpolated (ω / factor) frequencies with a
linear ramp between the bounds of `ModelConfig.yarn_bounds()`; cos and sin are multiplied by the
concentration 0.1·ln(factor) + 1. Peng et al., https://arxiv.org/abs/2309.00071
"""

from __future__ import annotations

import torch

from runtime.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """[d/2] float64."""
    d = config.head_dim
    freq = config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    if config.rope_scaling_factor <= 1.0:
        return 1.0 / freq
    low, high = config.yarn_bounds()
    extrapolation = 1.0 / freq
    interpolation = 1.0 / (config.rope_scaling_factor * freq)
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    mask = 1 - ramp  # 1 → keep the original (high-frequency) component
    return interpolation * (1 - mask) + extrapolation * mask


def rope_table(
    config: ModelConfig, max_positions: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [max_positions, d/2] fp32, concentration applied."""
    inv = inverse_frequencies(config)
    t = torch.arange(max_positions, dtype=torch.float64)
    angles = torch.outer(t, inv)
    c = config.yarn_concentration()
    cos = (torch.cos(angles) * c).to(torch.float32)
    sin = (torch.sin(angles) * c).to(torch.float32)
    return cos.to(device), sin.to(device)
