"""Where things are in the repository: its root, the models and images it ships."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RANDOM = os.path.join(ROOT, "models", "tiny-random")  # a multimodal hub checkpoint, float32
DEMO_MODEL = os.path.join(ROOT, "models", "aria-jax-demo")  # context 256 tokens, 16 image tokens per crop
SHAPES_PNG = os.path.join(ROOT, "examples", "shapes.png")
