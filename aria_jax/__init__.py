"""aria-jax: Aria (rhymes-ai/Aria), the multimodal mixture-of-experts model, in JAX/Flax."""

from aria_jax.config import AriaConfig, AriaTextConfig, AriaVisionConfig, ConfigError
from aria_jax.pretrained import AriaTextForCausalLM, CausalLMOutput
from aria_jax.safetensors_io import CheckpointError

__all__ = [
    "AriaConfig", "AriaTextConfig", "AriaVisionConfig", "AriaTextForCausalLM", "CausalLMOutput",
    "CheckpointError", "ConfigError",
]
