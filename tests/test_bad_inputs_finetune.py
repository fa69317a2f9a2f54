"""Hostile inputs to fine-tuning, and runs killed on the way (issue 15, fine-tuning items):
- settings that are not finite or out of range (`--lr nan`, `--max-grad-norm -1`, ...) are refused
  before anything is written, with one error line naming the setting and its value;
- an output directory that is, contains or lies inside the model or the data is refused;
- resuming with another LoRA rank says which setting differs, and nothing is printed at exit;
- a step with a non-finite loss, gradient norm or params ends the run without saving it;
- a metrics log cut short by a kill does not block the resume; another bad line is named;
- SIGKILL at named points of a run (`aria_jax.files.pause_point`), then the same command again:
  it resumes from the newest checkpoint and ends with the model of an uninterrupted run, the
  log holds each step once, and the model and data directories are untouched.

The runs go through `python -m aria_jax.cli` in subprocesses that share a persistent compilation
cache and compile at XLA's lowest optimization level: the uninterrupted run compiles the step
(in half the time of the default level) while the tests without a run go on, the other runs load
it. All of them compile alike, so their results compare bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

import aria_jax
import aria_jax.finetune
from aria_jax.finetune import ResumeError, RunSettings, TrainingDivergedError, _truncate_metrics, finetune
from aria_jax.lora import LoraConfig
from aria_jax.train import TrainConfig, TrainConfigError
from cli_helpers import assert_one_line_error, run_main
from crash_points import kill_at
from test_finetune import SETTINGS, TINY, dataset, logged_steps  # noqa: F401 (dataset: its fixture)
from repo_paths import ROOT

STEPS = 6
# test_finetune's data settings, as command-line options, with a checkpoint every 2 of 6 steps.
RUN_OPTIONS = [
    "--steps",
    str(STEPS),
    "--warmup-steps",
    "2",
    "--lr",
    "1e-2",
    "--grad-accum",
    "2",
    "--save-every",
    "2",
    "--batch-size",
    str(SETTINGS.batch_size),
    "--max-image-size",
    str(SETTINGS.max_image_size),
    "--max-length",
    str(SETTINGS.max_length),
    "--seed",
    str(SETTINGS.seed),
    "--lora-rank",
    "2",
    "--lora-alpha",
    "4",
    "--quiet",
]
RUN_TIMEOUT = 300  # seconds; the first run compiles the step (~25 s on 2 busy cores)


def tree_digest(directory: str) -> dict[str, str]:
    """Relative path -> sha256 of every file under `directory`."""
    digests = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> dict:
    return {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax-cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0",
    }


def logged_metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def cli_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "aria_jax.cli", *argv]


def run_cli(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(argv), env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )


def finetune_argv(model: str, data: str, out: str) -> list[str]:
    return ["finetune", "--model", model, "--data", data, "--out", out, *RUN_OPTIONS]


@pytest.fixture(scope="module", autouse=True)
def reference_run(dataset, compile_cache, tmp_path_factory):
    """The uninterrupted run, started with the module: (its process, its output directory)."""
    out = str(tmp_path_factory.mktemp("reference") / "out")
    process = subprocess.Popen(
        cli_command(finetune_argv(TINY, dataset, out)),
        env={**os.environ, **compile_cache},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield process, out
    if process.poll() is None:  # the tests that wait for it were not run
        process.kill()
    process.communicate()


@pytest.fixture(scope="module")
def reference(reference_run) -> str:
    """The uninterrupted run's output directory, once it is complete."""
    process, out = reference_run
    _, stderr = process.communicate(timeout=RUN_TIMEOUT)
    assert process.returncode == 0, stderr
    return out


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "field, value",
    [
        (field, value)
        for field, bad in {
            "learning_rate": [0.0, -1e-3],
            "weight_decay": [-0.1],
            "adam_b1": [1.0, -0.1],
            "adam_b2": [1.0, 1.5],
            "adam_eps": [0.0, -1e-8],
            "max_grad_norm": [-1.0],
            "z_loss_coeff": [-1e-5],
            "aux_loss_coeff": [-1e-3],
        }.items()
        for value in [math.nan, math.inf, -math.inf, "0.1", *bad]
    ],
)
def test_train_config_refuses_non_finite_and_out_of_range_floats(field, value):
    with pytest.raises(TrainConfigError) as error:
        TrainConfig(**{field: value})
    shown = repr(value) if isinstance(value, str) else str(value)
    assert f"TrainConfig.{field}={shown} must be a finite number" in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_grad_norm": 0.0, "weight_decay": 0.0, "z_loss_coeff": 0.0, "aux_loss_coeff": 0.0, "adam_b1": 0.0},
        {"learning_rate": 1, "warmup_steps": 1000, "total_steps": 1000},
    ],
)
def test_train_config_accepts_the_edges_of_each_range(overrides):
    """0 turns clipping, weight decay and the router losses off; integers are numbers too."""
    TrainConfig(**overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"total_steps": 0}, "TrainConfig.total_steps=0 must be an integer at least 1"),
        ({"total_steps": 2.5}, "TrainConfig.total_steps=2.5 must be an integer"),
        ({"grad_accum_steps": True}, "TrainConfig.grad_accum_steps=True must be an integer"),
        (
            {"warmup_steps": 11, "total_steps": 10},
            "TrainConfig.warmup_steps=11 must be an integer in [0, total_steps=10]",
        ),
        ({"lora": LoraConfig(rank=2, alpha=math.nan)}, "TrainConfig.lora.alpha=nan must be a finite number > 0"),
        ({"lora": LoraConfig(rank=2, alpha=0.0)}, "TrainConfig.lora.alpha=0.0 must be a finite number > 0"),
        ({"lora": 4}, "TrainConfig.lora=4 must be a LoraConfig or None"),
        ({"learning_rate": 10**400}, "TrainConfig.learning_rate=1000"),  # finite, but beyond any float
    ],
)
def test_train_config_refuses_bad_counts_lora_settings_and_unrepresentable_numbers(overrides, message):
    with pytest.raises(TrainConfigError) as error:
        TrainConfig(**overrides)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 0}, "RunSettings.batch_size=0 must be an integer at least 1"),
        ({"save_every": -5}, "RunSettings.save_every=-5"),
        ({"keep_checkpoints": 0}, "RunSettings.keep_checkpoints=0"),
        ({"max_length": 1.5}, "RunSettings.max_length=1.5"),
        ({"max_image_size": 0}, "RunSettings.max_image_size=0"),
        ({"seed": -1}, "RunSettings.seed=-1 must be an integer in [0, 2**32)"),
        # jax.random.key(2**32 + 3) is key(3): the run would repeat seed 3's silently.
        ({"seed": 2**32 + 3}, f"RunSettings.seed={2**32 + 3}"),
        ({"seed": 10**23}, f"RunSettings.seed={10**23}"),
    ],
)
def test_run_settings_refuse_out_of_range_values(overrides, message):
    with pytest.raises(TrainConfigError) as error:
        RunSettings(**overrides)
    assert message in str(error.value)


def test_error_types_are_value_errors_exported_by_the_package():
    for error in (TrainConfigError, ResumeError, TrainingDivergedError):
        assert issubclass(error, ValueError) and getattr(aria_jax, error.__name__) is error
        assert error.__name__ in aria_jax.__all__


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "nan"], "TrainConfig.learning_rate=nan must be a finite number > 0"),
        (["--lr", "inf"], "TrainConfig.learning_rate=inf"),
        (["--max-grad-norm", "-1"], "TrainConfig.max_grad_norm=-1.0 must be a finite number >= 0"),
        (["--max-grad-norm", "nan"], "TrainConfig.max_grad_norm=nan"),
        (["--weight-decay=-inf"], "TrainConfig.weight_decay=-inf"),
        (["--z-loss-coeff", "nan"], "TrainConfig.z_loss_coeff=nan"),
        (["--aux-loss-coeff", "-0.01"], "TrainConfig.aux_loss_coeff=-0.01"),
        (["--warmup-steps", "-1"], "TrainConfig.warmup_steps=-1"),
        (["--lora-rank", "2", "--lora-alpha", "nan"], "TrainConfig.lora.alpha=nan"),
        (["--seed", "100000000000000000000000"], "RunSettings.seed=100000000000000000000000"),
        (["--seed", "-3"], "RunSettings.seed=-3"),
    ],
)
def test_cli_refuses_bad_settings_in_one_line_before_writing(dataset, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert_one_line_error(
        run_main(capsys, "finetune", "--model", TINY, "--data", dataset, "--out", str(out), "--quiet", *args), message
    )
    assert not out.exists()


# ----------------------------------------------------------------------------- output directory


@pytest.mark.parametrize(
    "out, relation",
    [
        ("runs/x", "contains the model directory"),  # out/model would replace the base model
        ("runs/x/model", "is the model directory"),
        ("runs/x/model/run", "lies inside the model directory"),
        ("runs", "contains the model directory"),
        ("runs/x/data/out", "lies inside the data directory"),
        ("link-to-x", "contains the model directory"),  # a symlink is followed
    ],
)
def test_output_directory_apart_from_model_and_data(dataset, tmp_path, out, relation):
    """Refused before anything is written, the model and data files untouched; copies, so that a
    run that is not refused cannot harm the shared ones."""
    model, data = tmp_path / "runs" / "x" / "model", tmp_path / "runs" / "x" / "data"
    shutil.copytree(TINY, model)
    shutil.copytree(dataset, data)
    os.symlink(tmp_path / "runs" / "x", tmp_path / "link-to-x")
    before = tree_digest(str(tmp_path))
    with pytest.raises(TrainConfigError, match=f"the output directory .*{relation}"):
        finetune(str(model), str(data), str(tmp_path / out), TrainConfig(total_steps=2), SETTINGS, progress=False)
    assert tree_digest(str(tmp_path)) == before


def test_cli_refuses_an_output_directory_holding_the_model(tmp_path, dataset, capsys):
    model = tmp_path / "runs" / "x" / "model"
    shutil.copytree(TINY, model)
    before = tree_digest(str(tmp_path))
    assert_one_line_error(
        run_main(
            capsys,
            "finetune",
            "--model",
            str(model),
            "--data",
            dataset,
            "--out",
            str(tmp_path / "runs" / "x"),
            "--quiet",
        ),
        "contains the model directory",
    )
    assert tree_digest(str(tmp_path)) == before


# ----------------------------------------------------------------------------- metrics log


def write_log(path, records: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + tail)


def test_metrics_log_cut_short_by_a_kill_is_repaired(tmp_path):
    """A kill in the middle of a line leaves it without its end: dropped, the steps after the
    checkpoint too, and the next line starts on a line of its own."""
    log = tmp_path / "metrics.jsonl"
    write_log(
        log, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.25}], tail='{"step": 4, "lo'
    )
    _truncate_metrics(str(log), 2)
    assert log.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    write_log(log, [{"step": 1}], tail='{"step": 2}')  # whole, but its newline not written
    _truncate_metrics(str(log), 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


@pytest.mark.parametrize("bad_line", ['{"step": 2, "lo', "[1, 2]", '{"loss": 1.0}', '{"step": "2"}', "\udcff"])
def test_a_bad_line_before_the_last_is_an_error_naming_file_and_line(tmp_path, bad_line):
    log = tmp_path / "metrics.jsonl"
    log.write_text(f'{{"step": 1}}\n{bad_line}\n{{"step": 3}}\n', errors="surrogateescape")
    before = log.read_bytes()
    with pytest.raises(ResumeError, match=re.escape(f"{log} line 2 is not a metrics record")):
        _truncate_metrics(str(log), 3)
    assert log.read_bytes() == before


def test_metrics_log_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A failure (or a kill) while the shortened log is written leaves the old one."""
    log = tmp_path / "metrics.jsonl"
    write_log(log, [{"step": 1}, {"step": 2}])
    before = log.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _truncate_metrics(str(log), 1)
    assert log.read_bytes() == before


# ----------------------------------------------------------------------------- diverged steps


@pytest.mark.parametrize("bad_metric, bad_step", [("loss", 3), ("param_norm", 4)])
def test_a_diverged_step_is_not_saved_and_the_run_resumes_before_it(
    dataset, tmp_path, monkeypatch, bad_metric, bad_step
):
    """The step's metrics as the jitted step returns them, one of them non-finite at `bad_step`
    (a stand-in step, so that no step is compiled): the run stops there, the last checkpoint
    before it stays and resumes, no final model is written. Non-finite params after the last
    step would otherwise go straight into out/model."""
    out = str(tmp_path / "out")
    poisoned = {"step": bad_step}

    def stand_in_jit_train_step(config, train_config, dtype):
        def step(state, frozen, batches):
            tokens = float(batches["attention_mask"].sum())
            metrics = {"loss": 1.0, "grad_norm": 1.0, "param_norm": 1.0, "tokens": tokens}
            if int(state.step) + 1 == poisoned["step"]:
                metrics[bad_metric] = math.nan if bad_metric == "loss" else math.inf
            return state.replace(step=state.step + 1), metrics

        return step

    monkeypatch.setattr(aria_jax.finetune, "jit_train_step", stand_in_jit_train_step)
    config = TrainConfig(total_steps=4, grad_accum_steps=2)
    settings = RunSettings(**{**SETTINGS.__dict__, "save_every": 2})
    with pytest.raises(
        TrainingDivergedError,
        match=rf"training diverged at step {bad_step} \({bad_metric} (nan|inf)\)"
        rf".*newest checkpoint in .*: step 2\)",
    ):
        finetune(TINY, dataset, out, config, settings, progress=False)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["2"]
    assert not os.path.exists(os.path.join(out, "model"))
    assert logged_steps(out) == list(range(1, bad_step))

    poisoned["step"] = None
    resumed = finetune(TINY, dataset, out, config, settings, progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 4 and os.path.isdir(resumed.model_dir)
    assert logged_steps(out) == [1, 2, 3, 4]


def test_a_model_that_gives_nan_stops_the_cli_at_step_1(dataset, reference, compile_cache, tmp_path):
    """The real step on a model with a NaN weight (as `--lr nan` gave before it was refused):
    one error line, exit 2, no checkpoint, no model."""
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    weights = safetensors.numpy.load_file(str(model / "model.safetensors"))
    norm = "language_model.model.norm.weight"  # the decoder's final norm: every logit turns NaN
    weights[norm] = np.full_like(weights[norm], np.nan)
    safetensors.numpy.save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    done = run_cli(finetune_argv(str(model), dataset, str(out)), compile_cache)
    assert assert_one_line_error(done).startswith("aria-jax: error: training diverged at step 1 (loss nan")
    assert sorted(os.listdir(out)) == ["checkpoints", "metrics.jsonl"]
    assert os.listdir(out / "checkpoints") == [] and logged_steps(str(out)) == []


# ----------------------------------------------------------------------------- resume


def test_resume_with_another_lora_rank_names_it_in_one_line(reference, dataset, compile_cache, tmp_path):
    """Not orbax's shape message followed by errors at interpreter exit; the run's files stay
    as they were."""
    out = str(tmp_path / "out")
    shutil.copytree(reference, out)
    before = tree_digest(out)
    argv = finetune_argv(TINY, dataset, out)
    argv[argv.index("--lora-rank") + 1] = "4"
    done = run_cli(argv, compile_cache)
    assert done.returncode == 2
    assert done.stderr == (
        f"aria-jax: error: {out}/checkpoints holds checkpoints of a run with other settings "
        f"(lora.rank 2 -> 4); resume with the same settings or choose another output directory\n"
    )
    assert tree_digest(out) == before


# ----------------------------------------------------------------------------- killed runs


@pytest.mark.parametrize(
    "point, checkpoints, resumed_at",
    [
        ("finetune:logged-step-3", ["2"], 2),  # step 3 logged, not saved: logged again
        ("finetune:saved-step-4", ["2", "4"], 4),
        ("finetune:before-final-model", ["2", "4", "6"], 6),
    ],
)
def test_killed_run_resumes_to_the_uninterrupted_result(
    reference, dataset, compile_cache, tmp_path, point, checkpoints, resumed_at
):
    out = str(tmp_path / "out")
    argv = finetune_argv(TINY, dataset, out)
    sources = {TINY: tree_digest(TINY), dataset: tree_digest(dataset)}

    kill_at(argv, point, timeout=RUN_TIMEOUT, env=compile_cache)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == checkpoints
    assert not os.path.exists(os.path.join(out, "model")) and not os.path.exists(os.path.join(out, "adapter"))
    if point == "finetune:logged-step-3":
        with open(os.path.join(out, "metrics.jsonl"), "a") as log:
            log.write('{"balance_loss": 3.99, "ce_lo')  # as a kill while step 4 is logged leaves it

    done = run_cli(argv, compile_cache)
    assert done.returncode == 0, done.stderr
    assert f"{STEPS} steps (resumed at {resumed_at})" in done.stdout
    assert logged_steps(out) == list(range(1, STEPS + 1))
    ours, expected = logged_metrics(out), logged_metrics(reference)
    assert [m["loss"] for m in ours] == [m["loss"] for m in expected]
    assert all(m["param_norm"] > 0 for m in ours)
    assert sorted(os.listdir(out)) == ["adapter", "checkpoints", "metrics.jsonl", "model"]
    for name in ("model", "adapter"):
        assert sorted(os.listdir(os.path.join(out, name))) == sorted(os.listdir(os.path.join(reference, name)))
    for name in ("model/model.safetensors", "adapter/adapter_model.safetensors"):
        ours = safetensors.numpy.load_file(os.path.join(out, name))
        expected = safetensors.numpy.load_file(os.path.join(reference, name))
        assert ours.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(ours[key], expected[key], err_msg=f"{name}: {key}")
    assert {path: tree_digest(path) for path in sources} == sources
    assert os.listdir(tmp_path) == ["out"]
