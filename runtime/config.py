"""ModelConfig: the gpt-oss family's hyper-parameters, read from either config.json layout.

Two public layouts exist (DESIGN §4):
- *original* (openai/gpt-oss): flat keys `num_experts`, `experts_per_token`, `rope_scaling_factor`,
  `rope_ntk_alpha`, `rope_ntk_beta`, `initial_context_length`; sliding window on even layers.
- *Hugging Face* (`model_type: gpt_oss`): `num_local_experts`, `num_experts_per_tok`, `layer_types`,
  YaRN under `rope_parameters` (transformers ≥ 5) or `rope_scaling` (older), optional
  `quantization_config`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


class ConfigError(ValueError):
    """A config.json that does not describe a valid gpt-oss model."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_experts: int = 32
    experts_per_token: int = 4
    sliding_window: int = 128
    # One entry per layer; empty means the gpt-oss default (sliding on even layers).
    layer_types: tuple[str, ...] = ()
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0  # YaRN factor; 1.0 disables YaRN
    rope_ntk_alpha: float = 1.0  # beta_slow
    rope_ntk_beta: float = 32.0  # beta_fast
    initial_context_length: int = 4096  # YaRN's original context
    max_position_embeddings: int = 131072
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    quantized_experts: bool = True  # MXFP4 on disk (unquantized experts are quantized at load)
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
            "experts_per_token", "sliding_window", "initial_context_length",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.experts_per_token > self.num_experts:
            raise ConfigError(
                f"experts_per_token ({self.experts_per_token}) exceeds num_experts "
                f"({self.num_experts})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        # MXFP4 groups of 32 run along the input dimension of both expert matrices.
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                raise ConfigError(f"{name} must be a multiple of 32 (MXFP4 groups)")
        if not self.layer_types:
            default = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", default)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ConfigError(f"unknown layer_types {bad}; expected {SLIDING!r} or {FULL!r}")
        if self.rope_scaling_factor < 1.0:
            raise ConfigError(f"rope_scaling_factor must be ≥ 1, got {self.rope_scaling_factor}")
        if self.rope_scaling_factor > 1.0:
            low, high = self.yarn_bounds()
            if not 0 < low < high < self.head_dim / 2 - 1:
                raise ConfigError(
                    f"YaRN ramp bounds low={low:.3f}, high={high:.3f} must satisfy "
                    f"0 < low < high < head_dim/2 - 1 = {self.head_dim / 2 - 1}: "
                    "raise head_dim or initial_context_length"
                )

    # ---- derived -------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def yarn_bounds(self) -> tuple[float, float]:
        """YaRN's ramp bounds in units of frequency index: (d/2)·ln(ctx₀/(β·2π))/ln(θ)."""
        d_half = self.head_dim / 2

        def bound(beta: float) -> float:
            return d_half * math.log(self.initial_context_length / (beta * 2 * math.pi)) / (
                math.log(self.rope_theta)
            )

        return bound(self.rope_ntk_beta), bound(self.rope_ntk_alpha)

    def yarn_concentration(self) -> float:
        if self.rope_scaling_factor <= 1.0:
            return 1.0
        return 0.1 * math.log(self.rope_scaling_factor) + 1.0

    def with_(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (layer_types re-derived unless given)."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return replace(self, **changes)

    # ---- (de)serialisation -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        try:
            if raw.get("model_type") == "gpt_oss" or "num_local_experts" in raw:
                return cls._from_hf(raw)
            if "num_experts" in raw:
                return cls._from_original(raw)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"config.json is missing or mistypes {exc}") from exc
        raise ConfigError(
            "config.json is neither the original gpt-oss layout (num_experts) nor the Hugging Face "
            "gpt_oss layout (model_type / num_local_experts)"
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{cfg_file}: not found")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cfg_file}: not valid JSON ({exc})") from exc
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            gen = json.loads(gen_file.read_text())
            if gen.get("eos_token_id") is not None:
                raw = {**raw, "eos_token_id": gen["eos_token_id"]}
        cfg = cls.from_dict(raw)
        return replace(cfg, name=path.name)

    @classmethod
    def _from_original(cls, raw: dict[str, Any]) -> ModelConfig:
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw["num_key_value_heads"],
            head_dim=raw.get("head_dim", 64),
            num_experts=raw["num_experts"],
            experts_per_token=raw["experts_per_token"],
            sliding_window=raw.get("sliding_window", 128),
            # not in openai's files (sliding on even layers); written by us for custom patterns
            layer_types=tuple(raw.get("layer_types") or ()),
            rope_theta=float(raw.get("rope_theta", 150000.0)),
            rope_scaling_factor=float(raw.get("rope_scaling_factor", 32.0)),
            rope_ntk_alpha=float(raw.get("rope_ntk_alpha", 1.0)),
            rope_ntk_beta=float(raw.get("rope_ntk_beta", 32.0)),
            initial_context_length=raw.get("initial_context_length", 4096),
            max_position_embeddings=raw.get(
                "max_position_embeddings",
                int(raw.get("initial_context_length", 4096) * raw.get("rope_scaling_factor", 32)),
            ),
            swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            eos_token_ids=_id_list(raw.get("eos_token_id")),
            pad_token_id=raw.get("pad_token_id"),
        )

    @classmethod
    def _from_hf(cls, raw: dict[str, Any]) -> ModelConfig:
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "yarn" if rope else "default"))
        if rope_type not in ("yarn", "default"):
            raise ConfigError(f"unsupported rope_type {rope_type!r}; gpt-oss uses 'yarn'")
        yarn = rope_type == "yarn"
        theta = rope.get("rope_theta", raw.get("rope_theta", 150000.0))
        quant = raw.get("quantization_config") or {}
        if quant and quant.get("quant_method") != "mxfp4":
            raise ConfigError(f"unsupported quantization {quant.get('quant_method')!r}")
        n_layers = raw["num_hidden_layers"]
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw["num_key_value_heads"],
            head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
            num_experts=raw["num_local_experts"],
            experts_per_token=raw.get("num_experts_per_tok", raw.get("experts_per_token", 4)),
            sliding_window=raw.get("sliding_window") or 128,
            layer_types=tuple(raw.get("layer_types") or ()),
            rope_theta=float(theta),
            rope_scaling_factor=float(rope.get("factor", 1.0)) if yarn else 1.0,
            rope_ntk_alpha=float(rope.get("beta_slow", 1.0)),
            rope_ntk_beta=float(rope.get("beta_fast", 32.0)),
            initial_context_length=int(rope.get("original_max_position_embeddings", 4096)),
            max_position_embeddings=raw.get("max_position_embeddings", 131072),
            swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            eos_token_ids=_id_list(raw.get("eos_token_id")),
            pad_token_id=raw.get("pad_token_id"),
            quantized_experts=bool(quant),
        )

    def to_original_dict(self) -> dict[str, Any]:
        out = {
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.initial_context_length,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_ntk_alpha,
            "rope_ntk_beta": self.rope_ntk_beta,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "eos_token_id": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
        }
        if self.layer_types != self.with_(layer_types=()).layer_types:
            out["layer_types"] = list(self.layer_types)
        return out

    def to_hf_dict(self, quantized: bool = True) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling_factor > 1.0:
            rope = {
                "rope_type": "yarn",
                "rope_theta": self.rope_theta,
                "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "original_max_position_embeddings": self.initial_context_length,
                # gpt-oss computes the YaRN ramp on unrounded bounds.
                "truncate": False,
            }
        out: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "experts_per_token": self.experts_per_token,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rope_scaling": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "swiglu_limit": self.swiglu_limit,
            "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "router_aux_loss_coef": 0.0,
            "output_router_logits": False,
            "use_cache": True,
            "eos_token_id": list(self.eos_token_ids) or None,
            "pad_token_id": self.pad_token_id,
        }
        if quantized:
            out["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn", "model.layers.*.mlp.router",
                    "model.embed_tokens", "lm_head",
                ],
            }
        return out


def _id_list(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


# gpt-oss's harmony format ends turns with <|return|> (200002) and <|call|> (200012); <|endoftext|>
# is 199999.
_GPT_OSS_EOS = (200002, 199999, 200012)

PRESETS: dict[str, ModelConfig] = {
    "20b": ModelConfig(
        num_hidden_layers=24, num_experts=32, eos_token_ids=_GPT_OSS_EOS, name="gpt-oss-20b"
    ),
    "120b": ModelConfig(
        num_hidden_layers=36, num_experts=128, eos_token_ids=_GPT_OSS_EOS, name="gpt-oss-120b"
    ),
    # The built-in demo model: small enough to run on a laptop CPU, real gpt-oss structure.
    # vocab 256 bytes + 3 specials; head_dim 16 keeps YaRN's ramp bounds valid.
    "tiny": ModelConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        experts_per_token=2,
        sliding_window=16,
        max_position_embeddings=4096,
        eos_token_ids=(257,),
        pad_token_id=258,
        name="tiny",
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown shape {name!r}; choose one of {sorted(PRESETS)}") from None
