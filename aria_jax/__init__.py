"""aria-jax: Aria (rhymes-ai/Aria), the multimodal mixture-of-experts model, in JAX/Flax.

The public names below are imported on first use: the `aria-jax` command line lives in this
package (`aria_jax.cli`), and `import aria_jax` loading JAX would make every `--help` slow and
leave `aria-jax plan` too late to choose JAX's devices."""

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "AriaConfig": "aria_jax.config",
    "AriaTextConfig": "aria_jax.config",
    "AriaVisionConfig": "aria_jax.config",
    "ConfigError": "aria_jax.config",
    "Engine": "aria_jax.engine",
    "ResumeError": "aria_jax.finetune",
    "TrainingDivergedError": "aria_jax.finetune",
    "RequestError": "aria_jax.host_loop",
    "AriaImageProcessor": "aria_jax.image_processing",
    "ImageError": "aria_jax.image_processing",
    "AriaProcessor": "aria_jax.processing",
    "AriaForConditionalGeneration": "aria_jax.pretrained",
    "AriaTextForCausalLM": "aria_jax.pretrained",
    "CausalLMOutput": "aria_jax.pretrained",
    "CheckpointError": "aria_jax.safetensors_io",
    "LayoutError": "aria_jax.sharding",
    "make_mesh": "aria_jax.sharding",
    "AriaTokenizer": "aria_jax.tokenizer",
    "TrainConfigError": "aria_jax.train",
    "AwakerConfig": "aria_jax.qwen2_vl.config",
    "Qwen2VLConfig": "aria_jax.qwen2_vl.config",
    "Qwen2VLImageProcessor": "aria_jax.qwen2_vl.image_processing",
    "Qwen2VLProcessor": "aria_jax.qwen2_vl.processing",
    "AwakerForConditionalGeneration": "aria_jax.qwen2_vl.pretrained",
    "Qwen2VLForConditionalGeneration": "aria_jax.qwen2_vl.pretrained",
    "Video": "aria_jax.video",
    "VideoError": "aria_jax.video",
    "load_video": "aria_jax.video",
}

__all__ = sorted([*_EXPORTS, "distributed"])


def __getattr__(name: str):
    """A public name, or a submodule (`aria_jax.distributed`), imported when first asked for."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif not name.startswith("_"):
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise  # the submodule exists and failed to import something
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
