"""Qwen2-VL's configs, read from either generation of its config.json.

- transformers 4.45 (the hub's Qwen/Qwen2-VL-*-Instruct, and what Awaker2.5-VL ships): the text
  fields at the top level, `rope_scaling: {"type": "mrope", "mrope_section": [16, 24, 24]}`,
  `rope_theta` beside them, a vision_config with `in_chans`.
- transformers 5: the text fields under `text_config` with `rope_parameters`; `in_channels`.

The decoder is Qwen2: q/k/v with biases, GQA, RMSNorm, a SiLU MLP, and M-RoPE: every token has a
(temporal, height, width) position, and `mrope_section` says how many of the head's rotary
frequencies each of the three streams drives (they sum to head_dim / 2).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from aria_jax.config import (
    SUPPORTED_ACTIVATIONS,
    ConfigError,
    check_decoder,
    eos_ids,
    is_int,
    json_object,
    positive_float,
    positive_ints,
    read_config_json,
    require,
)

MODEL_TYPES = ("qwen2_vl",)


@dataclasses.dataclass(frozen=True)
class Qwen2VLTextConfig:
    """The dense Qwen2 decoder with M-RoPE. Field names are those the shared decoder reads."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    bos_token_id: int | None = 151643
    eos_token_id: tuple[int, ...] = (151645,)
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    # Qwen2's q, k and v projections have biases.
    attention_bias: ClassVar[bool] = True
    # Every layer's MLP is one dense SiLU MLP (no experts).
    moe_num_experts: ClassVar[int] = 0
    lora_rank: ClassVar[int] = 0  # no Awaker adapters (`AwakerTextConfig`)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        object.__setattr__(self, "eos_token_id", eos_ids(self.eos_token_id))
        if isinstance(self.mrope_section, list):
            object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        positive_ints(
            self,
            (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "max_position_embeddings",
            ),
        )
        check_decoder(self)
        require(
            isinstance(self.mrope_section, tuple)
            and len(self.mrope_section) == 3
            and all(is_int(n) and n >= 0 for n in self.mrope_section)
            and sum(self.mrope_section) * 2 == self.head_dim,
            "mrope_section",
            self.mrope_section,
            f"must be three counts of rotary frequencies summing to head_dim / 2 = {self.head_dim // 2}",
        )
        require(isinstance(self.tie_word_embeddings, bool), "tie_word_embeddings", self.tie_word_embeddings, "a bool")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def pad_id(self) -> int:
        """The id generation writes after a row stops (pad_token_id, else 0)."""
        return self.pad_token_id if self.pad_token_id is not None else 0

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], top: dict[str, Any] | None = None) -> "Qwen2VLTextConfig":
        """A transformers 5 `text_config`, or the top level of a transformers 4.45 config.json
        (`top`: the whole file, whose token ids and tie flag count when the text part has none)."""
        json_object("text_config", d)
        top = top or d
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [key for key in required if key not in d]
        if missing:
            raise ConfigError(f"invalid config: missing field {missing[0]!r} in the Qwen2-VL text config")
        if d.get("use_sliding_window"):
            raise ConfigError(
                "invalid config: use_sliding_window=true: sliding-window attention is not supported "
                "(no released Qwen2-VL uses it)"
            )
        fields = {key: d[key] for key in required}
        for name in ("num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "hidden_act"):
            if d.get(name) is not None:
                fields[name] = d[name]
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
            value = d.get(name, top.get(name))
            if value is not None:
                fields[name] = value
        rope = json_object("rope_parameters", d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        require(rope_type in ("default", "mrope"), "rope_type", rope_type, "supported: mrope (default)")
        if rope.get("mrope_section") is not None:
            fields["mrope_section"] = rope["mrope_section"]
        theta = rope.get("rope_theta", d.get("rope_theta"))
        if theta is not None:
            positive_float("rope_theta", theta)
            fields["rope_theta"] = float(theta)
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers 5 text_config."""
        return {
            "model_type": "qwen2_vl_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "mrope_section": list(self.mrope_section),
            },
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


@dataclasses.dataclass(frozen=True)
class AwakerTextConfig(Qwen2VLTextConfig):
    """Qwen2's decoder with Awaker2.5-VL's adapters (`qwen2_vl.awaker`): LoRA of `lora_rank` on
    q/k/v, and `moe_lora_experts` routed LoRA experts plus a general one on o_proj and the MLP,
    all scaled by lora_alpha / lora_rank. The release: rank 256, alpha 512, 4 experts."""

    lora_rank: int = 256
    lora_alpha: float = 512.0
    moe_lora_experts: int = 4

    def __post_init__(self):
        super().__post_init__()
        positive_ints(self, ("lora_rank", "moe_lora_experts"), prefix="awaker.")
        positive_float("awaker.lora_alpha", self.lora_alpha)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def to_hf_dict(self) -> dict[str, Any]:
        return super().to_hf_dict()  # the adapters' settings are the top-level "awaker" object


@dataclasses.dataclass(frozen=True)
class Qwen2VLVisionConfig:
    """The vision tower: a ViT over 14 x 14 x 2 (temporal) patches with 2D rotary positions, then a
    merger of 2 x 2 neighbouring patches into one token of the decoder's width (`hidden_size`)."""

    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584
    hidden_act: str = "quick_gelu"
    mlp_ratio: int = 4
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2

    def __post_init__(self):
        positive_ints(
            self,
            (
                "depth",
                "embed_dim",
                "hidden_size",
                "mlp_ratio",
                "num_heads",
                "patch_size",
                "spatial_merge_size",
                "temporal_patch_size",
            ),
            prefix="vision_config.",
        )
        require(
            is_int(self.in_channels) and self.in_channels == 3,
            "vision_config.in_channels",
            self.in_channels,
            "must be 3: the image processor makes RGB patches",
        )
        require(
            self.embed_dim % self.num_heads == 0 and (self.embed_dim // self.num_heads) % 4 == 0,
            "vision_config.num_heads",
            self.num_heads,
            f"must divide embed_dim={self.embed_dim} into heads of a multiple of 4 (2D rotary)",
        )
        require(
            self.hidden_act in SUPPORTED_ACTIVATIONS,
            "vision_config.hidden_act",
            self.hidden_act,
            f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}",
        )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_width(self) -> int:
        return self.embed_dim * self.mlp_ratio

    @property
    def patch_features(self) -> int:
        """Values per patch in `pixel_values`: channels x temporal x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_area(self) -> int:
        """Patches merged into one decoder token."""
        return self.spatial_merge_size**2

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "Qwen2VLVisionConfig":
        json_object("vision_config", d)
        fields = {f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None}
        if "in_channels" not in fields and d.get("in_chans") is not None:  # transformers 4.45
            fields["in_channels"] = d["in_chans"]
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        return {"model_type": "qwen2_vl_vision", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    """The whole model: vision tower and merger, decoder, and the special token ids."""

    text_config: Qwen2VLTextConfig
    vision_config: Qwen2VLVisionConfig = Qwen2VLVisionConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        require(
            isinstance(self.text_config, Qwen2VLTextConfig),
            "text_config",
            self.text_config,
            "must be a Qwen2VLTextConfig",
        )
        require(
            isinstance(self.vision_config, Qwen2VLVisionConfig),
            "vision_config",
            self.vision_config,
            "must be a Qwen2VLVisionConfig",
        )
        require(
            self.vision_config.hidden_size == self.text_config.hidden_size,
            "vision_config.hidden_size",
            self.vision_config.hidden_size,
            f"the merger's output must be the decoder's width {self.text_config.hidden_size}",
        )
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(self, name)
            require(
                is_int(value) and 0 <= value < self.text_config.vocab_size,
                name,
                value,
                f"must be a token id below vocab_size={self.text_config.vocab_size}",
            )

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "Qwen2VLConfig":
        """A Qwen2-VL config.json; with an "awaker" object (written by `aria-jax convert --awaker`),
        an AwakerConfig."""
        json_object("config", d)
        model_type = d.get("model_type")
        require(model_type in MODEL_TYPES, "model_type", model_type, f"expected one of {', '.join(MODEL_TYPES)}")
        text = d["text_config"] if isinstance(d.get("text_config"), dict) else d
        text_config = Qwen2VLTextConfig.from_hf_dict(text, top=d)
        fields: dict[str, Any] = {"vision_config": Qwen2VLVisionConfig.from_hf_dict(d.get("vision_config") or {})}
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if d.get(name) is not None:
                fields[name] = d[name]
        if d.get("awaker") is None:
            return Qwen2VLConfig(text_config=text_config, **fields)
        awaker = json_object("awaker", d["awaker"])
        adapters = {name: awaker[name] for name in ("lora_rank", "lora_alpha", "moe_lora_experts") if name in awaker}
        for name in ("im_start_token_id", "im_end_token_id"):
            if awaker.get(name) is not None:
                fields[name] = awaker[name]
        text_config = AwakerTextConfig(**dataclasses.asdict(text_config), **adapters)
        return AwakerConfig(text_config=text_config, **fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """transformers 5's config.json."""
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "text_config": self.text_config.to_hf_dict(),
            "vision_config": self.vision_config.to_hf_dict(),
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.text_config.tie_word_embeddings,
        }


@dataclasses.dataclass(frozen=True)
class AwakerConfig(Qwen2VLConfig):
    """Awaker2.5-VL: Qwen2-VL with `AwakerTextConfig`'s adapters, and the ids of the tokens its
    routers' span is found by (they live in the tokenizer; the converter writes them here)."""

    im_start_token_id: int = 151644
    im_end_token_id: int = 151645

    def __post_init__(self):
        super().__post_init__()
        require(isinstance(self.text_config, AwakerTextConfig), "text_config", self.text_config, "an AwakerTextConfig")
        for name in ("im_start_token_id", "im_end_token_id"):
            value = getattr(self, name)
            require(
                is_int(value) and 0 <= value < self.text_config.vocab_size,
                f"awaker.{name}",
                value,
                f"must be a token id below vocab_size={self.text_config.vocab_size}",
            )

    def to_hf_dict(self) -> dict[str, Any]:
        text = self.text_config
        return {
            **super().to_hf_dict(),
            "awaker": {
                "lora_rank": text.lora_rank,
                "lora_alpha": text.lora_alpha,
                "moe_lora_experts": text.moe_lora_experts,
                "im_start_token_id": self.im_start_token_id,
                "im_end_token_id": self.im_end_token_id,
            },
        }


def is_qwen2_vl(d: dict[str, Any]) -> bool:
    """Whether a config.json describes a Qwen2-VL model (Awaker's included)."""
    return d.get("model_type") in MODEL_TYPES


def qwen2_vl_config_from_pretrained(path) -> Qwen2VLConfig:
    return Qwen2VLConfig.from_hf_dict(read_config_json(path))
