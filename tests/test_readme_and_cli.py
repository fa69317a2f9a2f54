"""The README's Python examples run as written, and the command line behaves as documented."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from repo_paths import DEMO_MODEL, ROOT, SHAPES_PNG, TINY_RANDOM


def readme_python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_python_examples():
    assert readme_python_blocks()


README_SERVER = "http://127.0.0.1:8000"  # where the README's client example finds the server


@pytest.fixture(scope="module")
def readme_server():
    """The README's `aria-jax serve --model models/aria-jax-demo --port 8000`, until the module ends."""
    import httpx2

    for _ in range(5):  # the README's bash example may still be releasing the port
        server = subprocess.Popen(
            [sys.executable, "-m", "aria_jax.cli", "serve", "--model", DEMO_MODEL, "--port", "8000"],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 180
        while server.poll() is None and time.time() < deadline:
            try:
                if httpx2.get(f"{README_SERVER}/health", timeout=1).status_code == 200:
                    yield
                    server.terminate()
                    server.wait(timeout=60)
                    return
            except httpx2.TransportError:
                time.sleep(0.2)
        server.kill()
        error = server.communicate()[1]
        if "address already in use" not in error:
            break
        time.sleep(2)
    pytest.fail(f"aria-jax serve did not start: {error[-2000:]}")


@pytest.mark.parametrize("block", readme_python_blocks())
def test_readme_python_block_runs(block, monkeypatch, request):
    monkeypatch.chdir(ROOT)
    if README_SERVER in block:
        request.getfixturevalue("readme_server")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    if README_SERVER in block:  # the serving examples ask the demo model about its picture
        assert namespace["answer"] == "triangle"
    if "Engine(" in block:
        assert namespace["answers"][0] == "triangle", namespace["answers"]
    if "logits" in namespace:
        assert np.all(np.isfinite(np.asarray(namespace["logits"])))
    if "tokens" in namespace:
        prompt = namespace["inputs"]["input_ids"] if "inputs" in namespace else namespace["input_ids"]
        np.testing.assert_array_equal(namespace["tokens"][:, : prompt.shape[1]], prompt)


def readme_bash_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S)


def test_readme_test_command_is_what_ci_runs():
    """The README's second command (install and test) is the one `.ci/run` runs; the first (the
    main job) runs in tests/test_demo_model.py."""
    test_command = readme_bash_blocks()[1].strip()
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert test_command in f.read().splitlines()


@pytest.mark.parametrize("block", readme_bash_blocks()[2:])
def test_readme_bash_block_runs(block):
    environment = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    environment.pop("XLA_FLAGS", None)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if "aria-jax chat" in block:  # two questions about the three yellow triangles, two answers
        assert result.stdout.split() == ["triangle", "yellow"], result.stdout
    if "aria-jax serve" in block:
        assert json.loads(result.stdout)["choices"][0]["message"]["content"] == "triangle", result.stdout


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aria_jax.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_generate_streams_the_answer_the_python_api_gives():
    import aria_jax
    from aria_jax.cli.generate import chat_prompt

    result = run_cli(
        "generate",
        "--model",
        TINY_RANDOM,
        "--image",
        SHAPES_PNG,
        "--prompt",
        "What shape is in the middle?",
        "--max-new-tokens",
        "6",
    )
    assert result.returncode == 0, result.stderr
    # The same answer through the Python API: greedy tokens up to <|im_end|> or eos, decoded.
    processor = aria_jax.AriaProcessor.from_pretrained(TINY_RANDOM)
    model = aria_jax.AriaForConditionalGeneration.from_pretrained(TINY_RANDOM)
    text = chat_prompt(processor, "What shape is in the middle?", 1)
    assert text.startswith("<|im_start|>user\n<fim_prefix><|img|><fim_suffix>What shape")
    inputs = processor(text=text, images=[SHAPES_PNG])
    tokens = model.generate(**inputs, max_new_tokens=6)[0, inputs["input_ids"].shape[1] :].tolist()
    stops = set(model.text_config.eos_token_id) | {processor.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    answer = tokens[: next((k for k, t in enumerate(tokens) if t in stops), len(tokens))]
    assert result.stdout == processor.decode(answer, skip_special_tokens=True) + "\n"


def test_generate_quantizes_as_the_python_api():
    """`--quantize int4 --kv-cache-dtype int8`: the answer of from_pretrained(quantize="int4")
    generating with an int8 cache."""
    import aria_jax
    from aria_jax.cli.generate import chat_prompt

    result = run_cli(
        "generate",
        "--model",
        TINY_RANDOM,
        "--image",
        SHAPES_PNG,
        "--prompt",
        "Describe it.",
        "--max-new-tokens",
        "6",
        "--quantize",
        "int4",
        "--kv-cache-dtype",
        "int8",
    )
    assert result.returncode == 0, result.stderr
    processor = aria_jax.AriaProcessor.from_pretrained(TINY_RANDOM)
    model = aria_jax.AriaForConditionalGeneration.from_pretrained(TINY_RANDOM, quantize="int4")
    assert model.params["language_model"]["lm_head"]["values"].dtype == "int4"
    inputs = processor(text=chat_prompt(processor, "Describe it.", 1), images=[SHAPES_PNG])
    answer = "".join(model.stream(**inputs, max_new_tokens=6, kv_cache_dtype="int8"))
    assert result.stdout == answer + "\n"


def test_sampling_options_are_checked():
    result = run_cli("generate", "--model", TINY_RANDOM, "--prompt", "hi", "--temperature", "0.7", "--top-p", "0")
    assert result.returncode == 2
    assert "top_p=0.0" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (("generate", "--model", "/no/such/dir", "--prompt", "hi"), "/no/such/dir"),
        (("generate", "--model", TINY_RANDOM, "--prompt", "hi", "--max-new-tokens", "0"), "--max-new-tokens"),
        (("generate", "--model", TINY_RANDOM, "--prompt", "hi", "--image", "/no/such.png"), "/no/such.png"),
        (
            ("generate", "--model", TINY_RANDOM, "--prompt", "hi", "--image", SHAPES_PNG, "--max-image-size", "100"),
            "max_image_size=100",
        ),
    ],
)
def test_user_errors_are_one_line(args, expected):
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any(expected in line for line in lines), result.stderr
    assert len([line for line in lines if "error" in line]) == 1, result.stderr
