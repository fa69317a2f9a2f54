"""Model configs: frozen, hashable dataclasses read from either generation of Aria's config.json.

Two on-disk generations exist (both in the hub repo rhymes-ai/Aria: its current config.json,
and the one of the remote-code revisions before the transformers integration):
- transformers-native (`text_config.model_type == "aria_text"`, vision `"idefics3_vision"`):
  `intermediate_size` is the expert width (1664 for Aria); rope theta in `rope_parameters`
  (transformers 5) or at the top level. Aria's file omits rms_norm_eps (1e-6) and
  moe_num_shared_experts (2), which come from the defaults, as in transformers' `AriaTextConfig`.
- the original remote-code format (`"aria_moe_lm"`, vision `"aria_vision_model"`): the expert
  width is `moe_intermediate_size`, and `intermediate_size` (13568) is unused and must be ignored
  (transformers' `src/transformers/models/aria/convert_aria_weights_to_hf.py` likewise sets
  intermediate_size from it).

The configs are hashable so they can be static arguments of jitted functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A config.json that cannot describe an Aria model; the message names the field and value."""


ORIGINAL_TEXT_MODEL_TYPE = "aria_moe_lm"
TEXT_MODEL_TYPES = ("aria_text", ORIGINAL_TEXT_MODEL_TYPE)
VISION_MODEL_TYPES = ("idefics3_vision", "aria_vision_model", "siglip_vision_model")
SUPPORTED_ROPE_TYPES = ("default",)
SUPPORTED_MOE_BACKENDS = ("auto", "ragged_dot", "looped", "gathered", "dense")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu")  # aria_jax.layers.ACTIVATIONS
# Token ids and positions are int32 on device, so every count, size and id must be below 2**31;
# that bound also keeps products of two of them (a weight's element count) inside int64.
INT32_LIMIT = 2**31


def require(condition: bool, field: str, value: Any, why: str) -> None:
    if not condition:
        raise ConfigError(f"invalid config: {field}={value!r}: {why}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # true is no count nor id


def is_finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def positive_ints(config: Any, fields: tuple[str, ...], prefix: str = "") -> None:
    for field in fields:
        value = getattr(config, field)
        require(
            is_int(value) and 0 < value < INT32_LIMIT, prefix + field, value, "must be a positive integer below 2**31"
        )


def positive_float(field: str, value: Any) -> None:
    require(is_finite(value) and value > 0, field, value, "must be a finite positive number")


def check_token_id(field: str, value: Any) -> None:
    require(
        value is None or (is_int(value) and 0 <= value < INT32_LIMIT),
        field,
        value,
        "must be null or a token id (an integer in 0 .. 2**31 - 1)",
    )


def json_object(field: str, value: Any) -> dict[str, Any]:
    require(isinstance(value, dict), field, value, "must be a JSON object")
    return value


def eos_ids(value: Any) -> Any:
    """A config's eos_token_id as a tuple: one id, a list of them, or none (anything else is left
    for `check_decoder` to name)."""
    if isinstance(value, int):
        return (value,)
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else value


def check_decoder(config: Any) -> None:
    """What every decoder config holds (Aria's and Qwen2's): heads that divide, norms, rotary
    base, token ids and activation. Counts are checked positive before (`positive_ints`)."""
    require(
        config.hidden_size % config.num_attention_heads == 0,
        "num_attention_heads",
        config.num_attention_heads,
        f"must divide hidden_size={config.hidden_size}",
    )
    require(
        config.num_attention_heads % config.num_key_value_heads == 0,
        "num_key_value_heads",
        config.num_key_value_heads,
        f"must divide num_attention_heads={config.num_attention_heads}",
    )
    positive_float("rms_norm_eps", config.rms_norm_eps)
    positive_float("rope_theta", config.rope_theta)
    check_token_id("bos_token_id", config.bos_token_id)
    check_token_id("pad_token_id", config.pad_token_id)
    require(
        isinstance(config.eos_token_id, tuple) and all(is_int(i) and 0 <= i < INT32_LIMIT for i in config.eos_token_id),
        "eos_token_id",
        config.eos_token_id,
        "must be null, a token id or a list of token ids (integers in 0 .. 2**31 - 1)",
    )
    require(
        config.hidden_act in SUPPORTED_ACTIVATIONS,
        "hidden_act",
        config.hidden_act,
        f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}",
    )


@dataclasses.dataclass(frozen=True)
class AriaTextConfig:
    """The MoE decoder. `intermediate_size` is the width of one routed expert."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    moe_num_experts: int
    moe_topk: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    moe_num_shared_experts: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = 2
    # How routed experts are computed: "ragged_dot" (sort tokens by expert, grouped matmul),
    # "looped" (sorted, then plain matmuls expert by expert: the fast one on CPU), "gathered"
    # (each token reads its chosen experts' weights), "dense" (every expert on every token; the
    # reference), "auto" (gathered for few tokens, as in decode, else looped on CPU and
    # ragged_dot elsewhere).
    moe_backend: str = "auto"
    # What the shared decoder can also be (Qwen2-VL's config sets them): Aria has none of them.
    attention_bias: ClassVar[bool] = False
    mrope_section: ClassVar[tuple[int, ...]] = ()
    tie_word_embeddings: ClassVar[bool] = False
    lora_rank: ClassVar[int] = 0  # Awaker's adapters (`qwen2_vl.awaker`)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if (
            self.head_dim is None
            and is_int(self.hidden_size)
            and is_int(self.num_attention_heads)
            and self.num_attention_heads > 0
        ):
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        object.__setattr__(self, "eos_token_id", eos_ids(self.eos_token_id))
        self.validate()

    def validate(self) -> None:
        positive_ints(
            self,
            (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "moe_num_experts",
                "moe_topk",
                "max_position_embeddings",
            ),
        )
        check_decoder(self)
        require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "must be even for rotary embeddings")
        require(
            self.moe_topk <= self.moe_num_experts,
            "moe_topk",
            self.moe_topk,
            f"cannot exceed moe_num_experts={self.moe_num_experts}",
        )
        require(
            is_int(self.moe_num_shared_experts) and 0 <= self.moe_num_shared_experts < INT32_LIMIT,
            "moe_num_shared_experts",
            self.moe_num_shared_experts,
            "must be a non-negative integer below 2**31",
        )
        require(
            self.moe_backend in SUPPORTED_MOE_BACKENDS,
            "moe_backend",
            self.moe_backend,
            f"supported: {', '.join(SUPPORTED_MOE_BACKENDS)}",
        )

    @property
    def pad_id(self) -> int:
        """The id generation writes after a row stops (pad_token_id, else 0)."""
        return self.pad_token_id if self.pad_token_id is not None else 0

    @property
    def shared_expert_size(self) -> int:
        return self.intermediate_size * self.moe_num_shared_experts

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "AriaTextConfig":
        """Reads a `text_config` (or a text-only config.json) of either generation."""
        json_object("text_config", d)
        model_type = d.get("model_type", "aria_text")
        require(
            model_type in TEXT_MODEL_TYPES,
            "text_config.model_type",
            model_type,
            f"expected one of {', '.join(TEXT_MODEL_TYPES)}",
        )
        width_key = "moe_intermediate_size" if model_type == ORIGINAL_TEXT_MODEL_TYPE else "intermediate_size"
        required = {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "intermediate_size": width_key,
            "num_hidden_layers": "num_hidden_layers",
            "num_attention_heads": "num_attention_heads",
            "moe_num_experts": "moe_num_experts",
            "moe_topk": "moe_topk",
        }
        missing = [key for key in required.values() if key not in d]
        if missing:
            raise ConfigError(f"invalid config: missing field {missing[0]!r} in text config ({model_type})")
        for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            require(not d.get(flag, False), flag, d.get(flag), "Aria has no such weights; only false is supported")

        fields = {ours: d[theirs] for ours, theirs in required.items()}
        for name in (
            "num_key_value_heads",
            "head_dim",
            "moe_num_shared_experts",
            "rms_norm_eps",
            "max_position_embeddings",
            "hidden_act",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        ):
            if d.get(name) is not None:
                fields[name] = d[name]
        rope_theta, rope_type = read_rope(d)
        require(
            rope_type in SUPPORTED_ROPE_TYPES, "rope_type", rope_type, f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
        if rope_theta is not None:
            positive_float("rope_theta", rope_theta)
            fields["rope_theta"] = float(rope_theta)
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers-native text_config."""
        return {
            "model_type": "aria_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "moe_num_experts": self.moe_num_experts,
            "moe_topk": self.moe_topk,
            "moe_num_shared_experts": self.moe_num_shared_experts,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": False,
        }


def read_rope(d: dict[str, Any]) -> tuple[float | None, str]:
    """rope theta and type from `rope_parameters`, `rope_scaling` or the top-level `rope_theta`."""
    params = json_object("rope_parameters", d.get("rope_parameters") or {})
    scaling = json_object("rope_scaling", d.get("rope_scaling") or {})
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = params.get("rope_theta", d.get("rope_theta"))
    return theta, rope_type


@dataclasses.dataclass(frozen=True)
class AriaVisionConfig:
    """The SigLIP/Idefics3 vision tower. Defaults are the full-size values that hub configs omit."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        positive_ints(
            self,
            (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "patch_size",
                "image_size",
            ),
            prefix="vision_config.",
        )
        require(
            is_int(self.num_channels) and self.num_channels == 3,
            "vision_config.num_channels",
            self.num_channels,
            "must be 3: the image processor makes RGB crops",
        )
        positive_float("vision_config.layer_norm_eps", self.layer_norm_eps)
        require(
            self.hidden_act in SUPPORTED_ACTIVATIONS,
            "vision_config.hidden_act",
            self.hidden_act,
            f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}",
        )
        require(
            self.hidden_size % self.num_attention_heads == 0,
            "vision_config.num_attention_heads",
            self.num_attention_heads,
            f"must divide vision hidden_size={self.hidden_size}",
        )
        require(
            self.patch_size <= self.image_size,
            "vision_config.patch_size",
            self.patch_size,
            f"must not exceed image_size={self.image_size}",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        """Patches along a side of the position grid; an image_size that is not a multiple of
        patch_size is floored, as the reference's stride-patch_size convolution drops the rest."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "AriaVisionConfig":
        # The hub file's `attention_heads` key is a typo that transformers ignores; so do we.
        json_object("vision_config", d)
        model_type = d.get("model_type", "idefics3_vision")
        require(
            model_type in VISION_MODEL_TYPES,
            "vision_config.model_type",
            model_type,
            f"expected one of {', '.join(VISION_MODEL_TYPES)}",
        )
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: d[name] for name in names if d.get(name) is not None})

    def to_hf_dict(self) -> dict[str, Any]:
        return {"model_type": "idefics3_vision", **dataclasses.asdict(self)}


def used_patch_to_query(pairs: tuple[tuple[int, int], ...], vision: AriaVisionConfig) -> tuple[tuple[int, int], ...]:
    """The (patches, queries) pairs a crop can have: square patch counts within the vision grid."""
    max_patches = vision.num_patches_per_side**2
    return tuple(
        (patches, queries)
        for patches, queries in pairs
        if patches > 0 and math.isqrt(patches) ** 2 == patches and patches <= max_patches
    )


def crop_size_to_queries(pairs: tuple[tuple[int, int], ...], vision: AriaVisionConfig) -> dict[int, int]:
    """Crop side in pixels -> image tokens per crop: a crop of side S has (S / patch_size)^2 patches."""
    return {math.isqrt(patches) * vision.patch_size: queries for patches, queries in used_patch_to_query(pairs, vision)}


# Aria's crops: 490 pixels = 35 x 35 patches of 14 -> 128 image tokens; 980 pixels = 70 x 70 -> 256.
ARIA_PATCH_TO_QUERY = ((1225, 128), (4900, 256))
ARIA_CROP_SIZE_TO_QUERIES = crop_size_to_queries(ARIA_PATCH_TO_QUERY, AriaVisionConfig())


@dataclasses.dataclass(frozen=True)
class AriaConfig:
    """The whole model: vision tower, projector, text decoder."""

    text_config: AriaTextConfig
    vision_config: AriaVisionConfig = AriaVisionConfig()
    # (number of patches of a crop, number of projector queries) pairs. A key no crop can have
    # (not a square, or more patches than the vision grid) is kept but never used, as in
    # transformers; the projector's query table has max_queries rows either way.
    projector_patch_to_query: tuple[tuple[int, int], ...] = ARIA_PATCH_TO_QUERY
    image_token_index: int = 9
    pad_token_id: int = 2

    def __post_init__(self):
        require(
            isinstance(self.text_config, AriaTextConfig), "text_config", self.text_config, "must be an AriaTextConfig"
        )
        require(
            isinstance(self.vision_config, AriaVisionConfig),
            "vision_config",
            self.vision_config,
            "must be an AriaVisionConfig",
        )
        pairs = patch_to_query_pairs(self.projector_patch_to_query)
        object.__setattr__(self, "projector_patch_to_query", pairs)
        require(len(pairs) > 0, "projector_patch_to_query_dict", {}, "must not be empty")
        for patches, queries in pairs:
            require(
                0 < patches < INT32_LIMIT,
                "projector_patch_to_query_dict",
                dict(pairs),
                f"key {patches} must be a positive number of patches below 2**31",
            )
            require(
                0 < queries < INT32_LIMIT,
                "projector_patch_to_query_dict",
                dict(pairs),
                f"query count {queries} must be positive and below 2**31",
            )
        max_patches = self.vision_config.num_patches_per_side**2
        require(
            bool(self.used_patch_to_query),
            "projector_patch_to_query_dict",
            dict(pairs),
            f"no key is a square number of patches at most {max_patches} (the vision grid): no crop could be projected",
        )
        require(
            is_int(self.image_token_index) and 0 <= self.image_token_index < self.text_config.vocab_size,
            "image_token_index",
            self.image_token_index,
            f"must be a token id below vocab_size={self.text_config.vocab_size}",
        )
        check_token_id("pad_token_id", self.pad_token_id)

    @property
    def max_queries(self) -> int:
        """Rows of the projector's query table: the largest query count of the map, used or not
        (transformers' max_value_projector_patch_to_query_dict)."""
        return max(queries for _, queries in self.projector_patch_to_query)

    @property
    def used_patch_to_query(self) -> tuple[tuple[int, int], ...]:
        """The (patches, queries) pairs a crop can have: square patch counts within the vision grid."""
        return used_patch_to_query(self.projector_patch_to_query, self.vision_config)

    @property
    def crop_size_to_queries(self) -> dict[int, int]:
        """Crop side in pixels -> image tokens per crop: the processor's `size_conversion`."""
        return crop_size_to_queries(self.projector_patch_to_query, self.vision_config)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "AriaConfig":
        json_object("config", d)
        if "text_config" not in d:
            raise ConfigError(
                f"config.json has no 'text_config': a text-only model (model_type "
                f"{d.get('model_type')!r}) without vision tower weights; load it with AriaTextForCausalLM"
            )
        fields: dict[str, Any] = {
            "text_config": AriaTextConfig.from_hf_dict(d["text_config"]),
            "vision_config": AriaVisionConfig.from_hf_dict(d.get("vision_config") or {}),
        }
        if d.get("projector_patch_to_query_dict") is not None:
            fields["projector_patch_to_query"] = d["projector_patch_to_query_dict"]
        image_token = d.get("image_token_index", d.get("image_token_id"))
        if image_token is not None:
            fields["image_token_index"] = image_token
        if d.get("pad_token_id") is not None:
            fields["pad_token_id"] = d["pad_token_id"]
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["AriaForConditionalGeneration"],
            "model_type": "aria",
            "text_config": self.text_config.to_hf_dict(),
            "vision_config": self.vision_config.to_hf_dict(),
            "projector_patch_to_query_dict": {str(k): v for k, v in self.projector_patch_to_query},
            "image_token_index": self.image_token_index,
            "pad_token_id": self.pad_token_id,
            "vision_feature_layer": -1,
        }


def patch_to_query_pairs(mapping: Any) -> tuple[tuple[int, int], ...]:
    """(patches, queries) pairs, sorted, from a dict or pairs; JSON keys are decimal strings."""
    field = "projector_patch_to_query_dict"
    try:
        items = list(dict(mapping).items())
    except (TypeError, ValueError):
        raise ConfigError(f"invalid config: {field}={mapping!r}: must map patch counts to query counts") from None
    pairs = []
    for patches, queries in items:
        if isinstance(patches, str) and patches.isascii() and patches.isdecimal():
            patches = int(patches)
        require(
            is_int(patches) and is_int(queries),
            field,
            dict(items),
            f"{patches!r}: {queries!r} is not a pair of integers",
        )
        pairs.append((patches, queries))
    return tuple(sorted(pairs))


def read_json_object(path: str, error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """A JSON file holding an object, or `error` with a one-line message naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: nesting too deep
        raise error(f"{path}: unreadable JSON ({' '.join(str(err).split()) or type(err).__name__})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def read_optional_json(directory: str, name: str, error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """`directory/name` as a dict, or {} when the file does not exist."""
    path = os.path.join(directory, name)
    return read_json_object(path, error) if os.path.isfile(path) else {}


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a model directory (or the file itself, or the file beside a weights file)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        file = os.path.join(path, "config.json")
    elif path.endswith(".json"):
        file = path
    else:  # a weights file: its config.json is beside it
        file = os.path.join(os.path.dirname(path), "config.json")
    if not os.path.isfile(file):
        raise ConfigError(f"no config.json found at {path}")
    return read_json_object(file)


def is_multimodal(d: dict[str, Any]) -> bool:
    return "text_config" in d


def text_config_from_pretrained(path: str | os.PathLike) -> AriaTextConfig:
    """The text config of a text-only or a multimodal checkpoint directory."""
    d = read_config_json(path)
    return AriaTextConfig.from_hf_dict(d["text_config"] if is_multimodal(d) else d)


def config_from_pretrained(path: str | os.PathLike) -> AriaConfig:
    return AriaConfig.from_hf_dict(read_config_json(path))
