"""`aria-jax generate`, `chat` and `serve` on Qwen2-VL and Awaker2.5-VL checkpoints, the family told
by config.json: answers equal the Python API's (an image, a second chat turn with the first in the
history, Awaker's two gates after `aria-jax convert --awaker`, chat completions over HTTP, with an
image for Qwen2-VL and after serve's warm-up for Awaker), and Aria's options, or Awaker's, are
refused for a family that has none of them."""

from __future__ import annotations

import io

import numpy as np
import openai
import pytest
from PIL import Image

from aria_jax.cli.models import AWAKER, QWEN2_VL, load_model, load_processor, model_family
from aria_jax.qwen2_vl.pretrained import AwakerForConditionalGeneration, Qwen2VLForConditionalGeneration
from aria_jax.qwen2_vl.processing import Qwen2VLProcessor
from cli_helpers import assert_one_line_error, run_main
from qwen2_vl_models import tiny_qwen2_vl_dir

MAX_NEW_TOKENS = 8
AWAKER_NEW_TOKENS = 32  # the tiny Awaker's gates part ways after 8 tokens
QUESTION = "What is in the picture?"
FOLLOW_UP = "And what colour is it?"


def user(text: str, num_images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}


def api_answer(model, processor, messages: list[dict], images: list, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The Python API's greedy answer to a conversation."""
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), images=images or None)
    return processor.decode_replies(model.generate(**inputs, max_new_tokens=max_new_tokens), inputs)[0]


@pytest.fixture(scope="module")
def qwen2_vl_dir() -> str:
    return tiny_qwen2_vl_dir()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("images") / "photo.png"
    Image.fromarray(pixels).resize((120, 80), Image.BICUBIC).save(path)
    return str(path)


@pytest.fixture(scope="module")
def qwen2_vl(qwen2_vl_dir):
    return Qwen2VLForConditionalGeneration.from_pretrained(qwen2_vl_dir), Qwen2VLProcessor.from_pretrained(qwen2_vl_dir)


def test_generate_with_an_image_equals_the_python_api(capsys, qwen2_vl_dir, qwen2_vl, image_file):
    expected = api_answer(*qwen2_vl, [user(QUESTION, 1)], [image_file])
    result = run_main(
        capsys, "generate", "--model", qwen2_vl_dir, "--image", image_file, "--prompt", QUESTION,
        "--max-new-tokens", str(MAX_NEW_TOKENS),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert expected and result.stdout == expected + "\n"


def test_chat_answers_two_turns_with_the_history(capsys, monkeypatch, qwen2_vl_dir, qwen2_vl, image_file):
    first_turn = [user(QUESTION, 1)]
    first = api_answer(*qwen2_vl, first_turn, [image_file])
    history = first_turn + [{"role": "assistant", "content": [{"type": "text", "text": first}]}, user(FOLLOW_UP)]
    second = api_answer(*qwen2_vl, history, [image_file])
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {image_file}\n{QUESTION}\n{FOLLOW_UP}\n"))
    result = run_main(capsys, "chat", "--model", qwen2_vl_dir, "--max-new-tokens", str(MAX_NEW_TOKENS))
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr
    assert result.stdout == f"{first}\n{second}\n"


@pytest.fixture(scope="module")
def awaker_dir(tmp_path_factory, qwen2_vl_dir) -> str:
    """A tiny Awaker2.5-VL: the release's pytorch_model.bin built on the tiny Qwen2-VL, then
    `aria-jax convert BASE DST --awaker BIN`."""
    import awaker_oracle as oracle
    from transformers import Qwen2VLForConditionalGeneration as Reference

    from aria_jax.cli import main

    directory = tmp_path_factory.mktemp("awaker")
    adapted = oracle.add_awaker_adapters(
        Reference.from_pretrained(qwen2_vl_dir, attn_implementation="eager"), 4, seed=3
    )
    oracle.save_awaker_bin(adapted, directory / "pytorch_model.bin")
    converted = str(directory / "converted")
    assert main(["convert", qwen2_vl_dir, converted, "--awaker", str(directory / "pytorch_model.bin")]) == 0
    return converted


def test_awaker_generate_equals_the_python_api_with_each_gate(capsys, awaker_dir, image_file):
    assert model_family(awaker_dir) == AWAKER
    model = AwakerForConditionalGeneration.from_pretrained(awaker_dir)
    processor = Qwen2VLProcessor.from_pretrained(awaker_dir)
    expected = {}
    for gate in AWAKER.gates:
        model.gate = gate  # one model for both gates: only the routers' inputs compile twice
        expected[gate] = api_answer(model, processor, [user(QUESTION, 1)], [image_file], AWAKER_NEW_TOKENS)
    # With an image the released gate routes the answer's tokens by other inputs than the prompt's.
    assert expected["released"] != expected["image_features"]
    for gate, options in (("released", []), ("image_features", ["--awaker-gate", "image_features"])):
        result = run_main(
            capsys, "generate", "--model", awaker_dir, "--image", image_file, "--prompt", QUESTION,
            "--max-new-tokens", str(AWAKER_NEW_TOKENS), *options,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected[gate] + "\n", gate


def test_serve_answers_an_image_chat_completion(qwen2_vl_dir, qwen2_vl, image_file):
    """The server's app over an engine on the model `aria-jax serve` loads for the checkpoint."""
    from aria_jax.cli.serve import warm_up
    from aria_jax.engine import Engine
    from aria_jax.server import create_app
    from test_serve import Server, data_url

    family = model_family(qwen2_vl_dir)
    assert family == QWEN2_VL
    image = Image.open(image_file).convert("RGB")
    expected = api_answer(*qwen2_vl, [user(QUESTION, 1)], [image])
    processor = load_processor(qwen2_vl_dir, family)
    engine = Engine(load_model(qwen2_vl_dir, family, "float32"), max_batch=2, max_length=256)
    warm_up(engine, processor, family)
    server = Server(create_app(engine, processor, "tiny-qwen2-vl"))
    try:
        with engine:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
            content = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": QUESTION}]
            response = client.chat.completions.create(
                model="tiny-qwen2-vl",
                messages=[{"role": "user", "content": content}],
                max_tokens=MAX_NEW_TOKENS,
                temperature=0,
            )
    finally:
        server.close()
    assert response.choices[0].message.content == expected


def test_engine_takes_the_processor_outputs_by_name(qwen2_vl, image_file):
    """`engine.submit(**inputs)` with Qwen2-VL's image inputs (pixel_values, image_grid_thw) by
    name, or by position, answers as `generate` does."""
    from aria_jax.engine import Engine

    model, processor = qwen2_vl
    messages, image = [user(QUESTION, 1)], Image.open(image_file).convert("RGB")
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), images=[image])
    assert {"pixel_values", "image_grid_thw"} <= set(inputs)
    expected = api_answer(model, processor, messages, [image])
    media = (inputs["pixel_values"], inputs["image_grid_thw"])
    with Engine(model, max_batch=2, max_length=256) as engine:
        by_name = engine.submit(**inputs, max_new_tokens=MAX_NEW_TOKENS).result()
        by_position = engine.submit(
            inputs["input_ids"], inputs["attention_mask"], *media, max_new_tokens=MAX_NEW_TOKENS
        )
        by_position = by_position.result()
    assert by_name.text == by_position.text == expected


def test_serve_warms_up_and_answers_awaker(awaker_dir):
    """Awaker's routers read the prompt's chat turns, so serve warms it up with a chat prompt;
    a text chat completion then gives the Python API's answer."""
    from aria_jax.cli.serve import warm_up
    from aria_jax.engine import Engine
    from aria_jax.server import create_app
    from test_serve import Server

    processor = load_processor(awaker_dir, AWAKER)
    model = load_model(awaker_dir, AWAKER, "float32")
    expected = api_answer(model, processor, [user(QUESTION)], [])
    engine = Engine(model, max_batch=2, max_length=256)
    warm_up(engine, processor, AWAKER)
    server = Server(create_app(engine, processor, "tiny-awaker"))
    try:
        with engine:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
            response = client.chat.completions.create(
                model="tiny-awaker",
                messages=[{"role": "user", "content": QUESTION}],
                max_tokens=MAX_NEW_TOKENS,
                temperature=0,
            )
    finally:
        server.close()
    assert response.choices[0].message.content == expected


@pytest.mark.parametrize(
    "command, options, expected",
    [
        ("generate", ["--split-image"], ["--split-image", "Aria's image options", "Qwen2-VL"]),
        ("chat", ["--max-image-size", "490"], ["--max-image-size", "Aria's image options", "Qwen2-VL"]),
        ("generate", ["--awaker-gate", "image_features"], ["--awaker-gate is for Awaker2.5-VL", "Qwen2-VL"]),
        ("serve", ["--awaker-gate", "released"], ["--awaker-gate is for Awaker2.5-VL", "Qwen2-VL"]),
    ],
)
def test_options_of_another_family_are_refused(capsys, qwen2_vl_dir, command, options, expected):
    prompt = ["--prompt", QUESTION] if command == "generate" else []
    result = run_main(capsys, command, "--model", qwen2_vl_dir, *prompt, *options)
    assert_one_line_error(result, *expected)
    assert "loading" not in result.stderr  # refused before the weights load
