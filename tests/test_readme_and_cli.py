"""The README's Python examples run as written, and the command line behaves as documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = os.path.join(ROOT, "models", "tiny-random")


def readme_python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_python_examples():
    assert readme_python_blocks()


@pytest.mark.parametrize("block", readme_python_blocks())
def test_readme_python_block_runs(block, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    if "logits" in namespace:
        assert np.all(np.isfinite(np.asarray(namespace["logits"])))
    if "tokens" in namespace and "input_ids" in namespace:
        tokens, prompt = namespace["tokens"], namespace["input_ids"]
        np.testing.assert_array_equal(tokens[:, : prompt.shape[1]], prompt)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convert.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def test_generate_prints_continuation_of_shipped_model():
    import aria_jax
    import sentencepiece

    result = run_cli("generate", "--model", TINY_MODEL, "--prompt", "The quick brown fox", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    # The same greedy continuation, computed through the Python API.
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=os.path.join(TINY_MODEL, "tokenizer.model"))
    model = aria_jax.AriaTextForCausalLM.from_pretrained(TINY_MODEL)
    prompt = tokenizer.encode("The quick brown fox")
    tokens = model.generate(np.asarray([prompt]), max_new_tokens=6)[0, len(prompt):].tolist()
    eos = set(model.config.eos_token_id)
    if eos & set(tokens):
        tokens = tokens[: min(tokens.index(e) for e in eos if e in tokens)]
    assert result.stdout == tokenizer.decode(tokens) + "\n"


@pytest.mark.parametrize("args, expected", [
    (("generate", "--model", "/no/such/dir", "--prompt", "hi"), "/no/such/dir"),
    (("generate", "--model", TINY_MODEL, "--prompt", "hi", "--max-new-tokens", "0"), "--max-new-tokens"),
])
def test_user_errors_are_one_line(args, expected):
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any(expected in line for line in lines), result.stderr
    assert len([line for line in lines if "error" in line]) == 1, result.stderr
