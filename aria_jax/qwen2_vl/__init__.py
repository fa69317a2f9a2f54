"""Qwen2-VL (and Awaker2.5-VL, Qwen2-VL with LoRA experts): the second model family, built on the shared layers, attention, generation, sharding and loading."""
