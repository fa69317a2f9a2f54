"""Fine-tuning runs end to end: exact resume, refused resume with other settings, the outputs
(hub-format model, adapters, metrics log) and the `aria-jax finetune` command."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.numpy

import aria_jax
from aria_jax import demo_task
from aria_jax.cli import main as cli_main
from aria_jax.finetune import RunSettings, finetune
from aria_jax.lora import LoraConfig, load_adapters
from aria_jax.train import TrainConfig
from repo_paths import TINY_RANDOM as TINY

SETTINGS = RunSettings(batch_size=2, max_image_size=70, max_length=64, save_every=4, seed=3)
# Two micro-batches per step, so the data position (batches consumed) differs from the step.
FULL = TrainConfig(learning_rate=3e-3, warmup_steps=2, total_steps=12, grad_accum_steps=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("data") / "shapes")
    demo_task.write_dataset(folder, num_examples=10, seed=0, size=70)
    return folder


def read_weights(model_dir: str) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(os.path.join(model_dir, "model.safetensors"))


def logged_steps(out: str) -> list[int]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    return out, finetune(TINY, dataset, out, FULL, SETTINGS, progress=False)


def test_resumed_run_equals_uninterrupted_run(dataset, uninterrupted, tmp_path):
    """12 steps in one go, versus 6 steps, stop, restore from the checkpoint, 6 more: the
    saved models are bit-identical, and the log holds each step once."""
    full_out, full = uninterrupted
    out = str(tmp_path / "interrupted")
    first = finetune(TINY, dataset, out, FULL, SETTINGS, progress=False, stop_at_step=6)
    assert first.steps == 6 and first.resumed_from is None
    assert not os.path.exists(first.model_dir), "a stopped run must not write the final model"
    second = finetune(TINY, dataset, out, FULL, SETTINGS, progress=False)
    assert second.resumed_from == 6 and second.steps == 12 and len(second.metrics) == 6

    ours, reference = read_weights(second.model_dir), read_weights(full.model_dir)
    assert ours.keys() == reference.keys()
    for key in reference:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)
    assert [m["loss"] for m in second.metrics] == [m["loss"] for m in full.metrics[6:]]
    assert logged_steps(out) == list(range(1, 13))


def test_training_changes_the_model_and_lowers_the_loss(uninterrupted):
    out, result = uninterrupted
    trained, base = read_weights(result.model_dir), read_weights(TINY)
    changed = [key for key in base if not np.array_equal(trained[key], base[key])]
    assert len(changed) > 0.9 * len(base), f"only {len(changed)} of {len(base)} tensors were trained"
    losses = [m["loss"] for m in result.metrics]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert logged_steps(out) == list(range(1, 13))
    # The output is a complete hub-format model: it loads and generates.
    model = aria_jax.AriaForConditionalGeneration.from_pretrained(result.model_dir)
    processor = aria_jax.AriaProcessor.from_pretrained(result.model_dir)
    assert set(os.listdir(TINY)) <= set(os.listdir(result.model_dir))
    inputs = processor(
        text="<|img|>What?", images=[demo_task.sample(np.random.default_rng(1), 70)[0]], max_image_size=70
    )
    assert model.generate(**inputs, max_new_tokens=3).shape == (1, inputs["input_ids"].shape[1] + 3)


def test_resume_with_other_settings_is_refused(dataset, uninterrupted):
    """Resuming a run's checkpoints with another learning rate or batch size would silently mix
    two runs: the error names each difference."""
    out, _ = uninterrupted
    other = TrainConfig(learning_rate=1e-3, warmup_steps=2, total_steps=12, grad_accum_steps=2)
    with pytest.raises(ValueError, match=r"learning_rate 0\.003 -> 0\.001") as error:
        finetune(TINY, dataset, out, other, RunSettings(**{**SETTINGS.__dict__, "batch_size": 1}), progress=False)
    assert "batch_size 2 -> 1" in str(error.value)


def test_lora_run_through_the_cli(dataset, tmp_path, capsys):
    """`aria-jax finetune --lora-rank`: only the adapted weights change in the merged model, and
    the adapters saved alone, merged into the base, give that same model."""
    out = str(tmp_path / "lora")
    code = cli_main(
        [
            "finetune",
            "--model",
            TINY,
            "--data",
            dataset,
            "--out",
            out,
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--lr",
            "1e-2",
            "--lora-rank",
            "2",
            "--lora-alpha",
            "4",
            "--max-image-size",
            "70",
            "--max-length",
            "64",
            "--quiet",
        ]
    )
    assert code == 0
    assert "4 steps, final loss" in capsys.readouterr().out
    merged, base = read_weights(os.path.join(out, "model")), read_weights(TINY)
    # The vision tower's post_layernorm is unused and exported as zeros (as the hub's files).
    changed = {key for key in base if not np.array_equal(merged[key], base[key]) and "post_layernorm" not in key}
    adapted_names = ("q_proj", "k_proj", "v_proj", "o_proj", "shared_experts", "experts.")
    assert changed and all("language_model" in key and any(n in key for n in adapted_names) for key in changed), changed

    model = aria_jax.AriaForConditionalGeneration.from_pretrained(TINY)
    adapters, config = load_adapters(os.path.join(out, "adapter"), model.params)
    assert config == LoraConfig(rank=2, alpha=4.0)
    remerged = aria_jax.AriaForConditionalGeneration.from_pretrained(os.path.join(out, "model"))
    from aria_jax.lora import merge_adapters

    expected = merge_adapters(model.params, adapters, config)
    np.testing.assert_allclose(
        np.asarray(remerged.params["language_model"]["layers"]["mlp"]["experts_down"]),
        np.asarray(expected["language_model"]["layers"]["mlp"]["experts_down"]),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/data"], "--data /nonexistent/data: no such directory"),
        (["--lora-rank", "2", "--lora-targets", "q_proj,wq"], "LoRA targets"),
        (["--freeze-vision", "--freeze-projector", "--freeze-language-model"], "nothing to train"),
    ],
)
def test_cli_errors_are_one_line(dataset, tmp_path, capsys, args, message):
    base = {"--model": TINY, "--data": dataset, "--out": str(tmp_path / "out")}
    for flag, value in zip(args[::2], args[1::2]):
        base.pop(flag, None)
    argv = ["finetune", *[x for item in base.items() for x in item], *args]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli_main(["finetune", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--steps",
        "--batch-size",
        "--grad-accum",
        "--lr",
        "--lora-rank",
        "--lora-targets",
        "--remat",
        "--save-every",
        "--mesh",
        "--freeze-vision",
    ):
        assert option in text
    assert "(default: 1000)" in text and "(default: 5e-05)" in text
