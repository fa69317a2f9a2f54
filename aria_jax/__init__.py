"""aria-jax: Aria (rhymes-ai/Aria), the multimodal mixture-of-experts model, in JAX/Flax."""

from aria_jax import distributed
from aria_jax.config import AriaConfig, AriaTextConfig, AriaVisionConfig, ConfigError
from aria_jax.engine import Engine
from aria_jax.finetune import ResumeError, TrainingDivergedError
from aria_jax.generator import RequestError
from aria_jax.image_processing import AriaImageProcessor, ImageError
from aria_jax.processing import AriaProcessor
from aria_jax.pretrained import AriaForConditionalGeneration, AriaTextForCausalLM, CausalLMOutput
from aria_jax.safetensors_io import CheckpointError
from aria_jax.sharding import LayoutError, make_mesh
from aria_jax.tokenizer import AriaTokenizer
from aria_jax.train import TrainConfigError
from aria_jax.video import Video, VideoError, load_video

__all__ = [
    "AriaConfig", "AriaTextConfig", "AriaVisionConfig", "AriaForConditionalGeneration",
    "AriaTextForCausalLM", "CausalLMOutput",
    "AriaImageProcessor", "AriaProcessor", "AriaTokenizer", "CheckpointError", "ConfigError", "Engine", "ImageError",
    "LayoutError", "RequestError", "ResumeError", "TrainConfigError", "TrainingDivergedError", "Video",
    "VideoError", "distributed", "load_video", "make_mesh",
]
