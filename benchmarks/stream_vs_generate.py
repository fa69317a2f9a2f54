"""Decode speed of `model.stream` against `model.generate`, same model and request, one run.

The model has the text dimensions of the "bench" config (hidden 1024, 8 heads of 128, 4 layers,
64 experts top-6 of width 640, 2 shared) with random weights and the shipped tiny model's
512-token vocabulary, so that the shipped tokenizer can decode what it streams.
Run: python benchmarks/stream_vs_generate.py [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import aria_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "models", "tiny-random")


def bench_model() -> aria_jax.AriaTextForCausalLM:
    config = aria_jax.AriaTextConfig(
        vocab_size=512,
        hidden_size=1024,
        intermediate_size=640,
        num_hidden_layers=4,
        num_attention_heads=8,
        moe_num_experts=64,
        moe_topk=6,
        moe_num_shared_experts=2,
        max_position_embeddings=4096,
        eos_token_id=(),
        pad_token_id=2,
    )
    model = aria_jax.AriaTextForCausalLM.from_random(config, seed=0)
    model.tokenizer = aria_jax.AriaTokenizer.from_pretrained(TOKENIZER_DIR)
    model.generator.tokenizer = model.tokenizer
    return model


def best_seconds(run, repeats: int) -> float:
    run()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = bench_model()
    prompt = np.random.default_rng(0).integers(10, 500, size=(1, 64))
    settings = dict(max_new_tokens=args.new_tokens, stop_strings=None)
    generate = best_seconds(lambda: model.generate(prompt, **settings), args.repeats)
    stream = best_seconds(lambda: list(model.stream(prompt, **settings)), args.repeats)
    print(f"{'':10s} {'seconds':>8s} {'tokens/s':>9s}")
    print(f"{'generate':10s} {generate:8.3f} {args.new_tokens / generate:9.1f}")
    print(f"{'stream':10s} {stream:8.3f} {args.new_tokens / stream:9.1f}")
    print(f"stream / generate time: {stream / generate:.3f}")


if __name__ == "__main__":
    main()
