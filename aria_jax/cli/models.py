"""Loading a model for a command: which family it is, its settings checked first, progress on stderr."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

from aria_jax.cli.options import UserError


@dataclasses.dataclass(frozen=True)
class Family:
    """What the commands need to know of a checkpoint's model family. The classes are named, not
    imported, so that reading a config does not import JAX."""

    name: str
    model_class_name: str
    processor_class_name: str
    multimodal: bool
    aria_image_options: bool  # takes --max-image-size, --split-image (Aria's crops and tiles) and --quantize
    gates: tuple[str, ...] = ()  # Awaker's router inputs (`AwakerForConditionalGeneration.GATES`)

    @property
    def model_class(self) -> type:
        import aria_jax

        return getattr(aria_jax, self.model_class_name)

    @property
    def processor_class(self) -> type:
        import aria_jax

        return getattr(aria_jax, self.processor_class_name)


ARIA = Family("Aria", "AriaForConditionalGeneration", "AriaProcessor", multimodal=True, aria_image_options=True)
ARIA_TEXT = Family("Aria text", "AriaTextForCausalLM", "AriaProcessor", multimodal=False, aria_image_options=True)
QWEN2_VL = Family(
    "Qwen2-VL", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", multimodal=True, aria_image_options=False
)
AWAKER = Family(
    "Awaker2.5-VL",
    "AwakerForConditionalGeneration",
    "Qwen2VLProcessor",
    multimodal=True,
    aria_image_options=False,
    gates=("released", "image_features"),
)


def model_family(model_dir: str) -> Family:
    """The family of the model in `model_dir`, told by its config.json as `families.config_from_directory`
    tells it; a UserError if there is no such directory."""
    from aria_jax.config import is_multimodal, read_config_json
    from aria_jax.families import is_qwen2_vl_config

    if not os.path.isdir(model_dir):
        raise UserError(f"{model_dir}: no such model directory")
    config = read_config_json(model_dir)
    if is_qwen2_vl_config(config):
        return AWAKER if config.get("awaker") is not None else QWEN2_VL
    return ARIA if is_multimodal(config) else ARIA_TEXT


def check_family_options(args: argparse.Namespace, family: Family) -> None:
    """Options of one family given for a checkpoint of another, refused before anything loads."""
    aria_options = [
        option
        for option, given in (
            ("--max-image-size", getattr(args, "max_image_size", None) is not None),
            ("--split-image", getattr(args, "split_image", False)),
        )
        if given
    ]
    if aria_options and not family.aria_image_options:
        raise UserError(
            f"{' and '.join(aria_options)}: Aria's image options; {args.model} holds a {family.name} model, whose "
            "processor sizes each image itself (min_pixels and max_pixels of its preprocessor config)"
        )
    if getattr(args, "quantize", None) and not family.aria_image_options:
        raise UserError(f"--quantize is for Aria checkpoints; {args.model} holds a {family.name} model")
    gate = getattr(args, "awaker_gate", None)
    if gate is not None and not family.gates:
        raise UserError(f"--awaker-gate is for Awaker2.5-VL checkpoints; {args.model} holds a {family.name} model")


def image_options(args: argparse.Namespace) -> dict:
    """Aria's image options the user set, for the processor (the others keep its defaults)."""
    options = {"max_image_size": args.max_image_size, "split_image": args.split_image}
    return {name: value for name, value in options.items() if value}


def check_sampling_options(args: argparse.Namespace, prompt_length: int, max_new_tokens: int) -> None:
    """The generation settings, checked before the weights load (which can take minutes) with
    the checks and messages of `model.generate`."""
    from aria_jax.config import read_config_json, text_config_from_pretrained
    from aria_jax.families import config_from_directory, is_qwen2_vl_config
    from aria_jax.host_loop import check_request

    if is_qwen2_vl_config(read_config_json(args.model)):
        text_config = config_from_directory(args.model).text_config
    else:
        text_config = text_config_from_pretrained(args.model)  # Aria's vision settings are checked as it loads
    check_request(
        1,
        prompt_length,
        text_config,
        None,
        max_new_tokens=max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature,
        top_k=0,
        top_p=args.top_p,
        seed=args.seed,
        stop_strings=None,
    )


def load_processor(model_dir: str, family: Family):
    return family.processor_class.from_pretrained(model_dir)


def load_model(
    model_dir: str, family: Family, dtype: str, quantize: str | None = None, mesh=None, gate: str | None = None
):
    """The family's model; `gate` (Awaker's only, checked by `check_family_options`) defaults to the release's."""
    options = {"gate": gate or family.gates[0]} if family.gates else {}
    if quantize:  # Aria's (`check_family_options`)
        options["quantize"] = quantize
    with progress_line(f"loading {model_dir}"):
        return family.model_class.from_pretrained(model_dir, dtype=dtype, mesh=mesh, **options)


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
