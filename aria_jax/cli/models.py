"""Loading a model for a command: what it is, its settings checked first, progress on stderr."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from aria_jax.cli.options import UserError


def takes_images(model_dir: str) -> bool:
    """Whether the model in `model_dir` is multimodal; a UserError if there is no such directory."""
    from aria_jax.config import is_multimodal, read_config_json

    if not os.path.isdir(model_dir):
        raise UserError(f"{model_dir}: no such model directory")
    return is_multimodal(read_config_json(model_dir))


def check_sampling_options(args: argparse.Namespace, prompt_length: int, max_new_tokens: int) -> None:
    """The generation settings, checked before the weights load (which can take minutes) with
    the checks and messages of `model.generate`."""
    from aria_jax.config import text_config_from_pretrained
    from aria_jax.host_loop import check_request

    check_request(
        1,
        prompt_length,
        text_config_from_pretrained(args.model),
        None,
        max_new_tokens=max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature,
        top_k=0,
        top_p=args.top_p,
        seed=args.seed,
        stop_strings=None,
    )


def load_model(model_dir: str, multimodal: bool, dtype: str, quantize: str | None = None, mesh=None):
    import aria_jax

    model_class = aria_jax.AriaForConditionalGeneration if multimodal else aria_jax.AriaTextForCausalLM
    with progress_line(f"loading {model_dir}"):
        return model_class.from_pretrained(model_dir, dtype=dtype, quantize=quantize, mesh=mesh)


@contextlib.contextmanager
def progress_line(what: str):
    """ "WHAT ... done in 2.0s" on stderr, so a slow step shows it is under way while stdout
    stays for the answer alone."""
    print(f"{what} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    print(f" done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
