"""A fine-tuning run: data, jitted steps, periodic checkpoints, exact resume, and the result as
a hub-format model. `aria-jax finetune` is this function.

What a run writes under `out`:
  checkpoints/<step>/  orbax CheckpointManager: trained params + optimizer state + step, and the
                       run's settings with the data position
  metrics.jsonl        one line per step: loss terms, gradient and param norms, learning rate, tokens/s
  model/               at the end: the fine-tuned model in hub format (adapters merged in)
  adapter/             LoRA runs only: the adapters alone

Running again with the same `out` resumes from the newest checkpoint. The data order is a
function of (seed, step) and the step is deterministic, so a resumed run ends with exactly the
params of an uninterrupted one. A step whose loss, gradient norm or params are not finite ends
the run before anything of it is saved (`TrainingDivergedError`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import orbax.checkpoint as ocp
from tqdm import tqdm

from aria_jax.data import Batches, SFTDataset
from aria_jax.export import save_model_directory
from aria_jax.files import overlap, pause_point
from aria_jax.lora import init_adapters, merge_adapters, save_adapters
from aria_jax.pretrained import AriaForConditionalGeneration
from aria_jax.processing import AriaProcessor
from aria_jax.sharding import replicate_to
from aria_jax.train import (
    TrainConfig,
    TrainConfigError,
    batch_to_mesh,
    check_setting,
    init_state,
    jit_train_step,
    learning_rate_schedule,
    merged_params,
    split_params,
    stack_micro_batches,
)


class ResumeError(ValueError):
    """The output directory holds a run that cannot be resumed as asked: checkpoints of other
    settings, or an unreadable metrics log."""


class TrainingDivergedError(ValueError):
    """A step's loss, gradient norm or params are not finite: the run stops before saving them."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    batch_size: int = 8  # rows per micro-batch; a step sees batch_size x grad_accum_steps
    max_image_size: int | None = None  # crop size; None: the checkpoint's default
    split_image: bool = False
    max_length: int = 2048  # longer examples are an error, not truncated
    save_every: int = 100  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3
    seed: int = 0  # data order and adapter init
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("batch_size", "max_length", "save_every", "keep_checkpoints"):
            check_setting("RunSettings", name, getattr(self, name), "at least 1", lambda n: n >= 1, integer=True)
        if self.max_image_size is not None:
            check_setting(
                "RunSettings",
                "max_image_size",
                self.max_image_size,
                "at least 1 (or None)",
                lambda n: n >= 1,
                integer=True,
            )
        # jax.random.key takes the seed modulo 2**32: larger seeds would repeat smaller ones' runs.
        check_setting("RunSettings", "seed", self.seed, "in [0, 2**32)", lambda n: 0 <= n < 2**32, integer=True)


@dataclasses.dataclass
class FinetuneResult:
    steps: int  # optimizer steps done, in total
    resumed_from: int | None  # the checkpoint's step, if the run resumed
    metrics: list[dict]  # this run's steps
    model_dir: str
    adapter_dir: str | None


# What must be equal for a checkpoint to be resumed: everything that changes the result.
def _run_identity(model_path: str, data_dir: str, train_config: TrainConfig, settings: RunSettings) -> dict:
    settings_dict = dataclasses.asdict(settings)
    for ignored in ("save_every", "keep_checkpoints"):
        del settings_dict[ignored]
    settings_dict.update(model=os.path.abspath(model_path), data=os.path.abspath(data_dir))
    return json.loads(json.dumps({"train_config": dataclasses.asdict(train_config), "settings": settings_dict}))


def _differences(saved: dict, current: dict, prefix: str = ""):
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):  # lora: name the field, not the whole config
            yield from _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            yield f"{prefix}{key} {old!r} -> {new!r}"


def _check_resumable(saved: dict, current: dict, directory: str) -> None:
    differences = [
        difference
        for group in ("train_config", "settings")
        for difference in _differences(saved.get(group, {}), current[group])
    ]
    if differences:
        raise ResumeError(
            f"{directory} holds checkpoints of a run with other settings ({'; '.join(differences)}); "
            f"resume with the same settings or choose another output directory"
        )


def _check_out_dir(out_dir: str, model_path: str, data_dir: str) -> None:
    """The run writes checkpoints and, at its end, out/model: neither may land in the model or
    the data it reads (`--model runs/x/model --out runs/x` would replace the base model)."""
    for what, path in (("model", model_path), ("data", data_dir)):
        relation = overlap(out_dir, path)
        if relation:
            raise TrainConfigError(
                f"the output directory {out_dir} {relation} the {what} directory {path}; "
                f"choose an output directory apart from the model and the data"
            )


def finetune(
    model_path: str,
    data_dir: str,
    out_dir: str,
    train_config: TrainConfig,
    settings: RunSettings = RunSettings(),
    *,
    mesh=None,
    progress: bool = True,
    stop_at_step: int | None = None,
) -> FinetuneResult:
    """Fine-tunes the model at `model_path` on the dataset folder `data_dir` (see
    `aria_jax.data`), writing into `out_dir`. `stop_at_step` ends the run early, after saving a
    checkpoint there (a later call resumes)."""
    _check_out_dir(out_dir, model_path, data_dir)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax logs every save as a warning
    end_step = train_config.total_steps if stop_at_step is None else min(stop_at_step, train_config.total_steps)
    processor = AriaProcessor.from_pretrained(model_path)
    dataset = SFTDataset(
        data_dir,
        processor,
        max_image_size=settings.max_image_size,
        split_image=settings.split_image,
        max_length=settings.max_length,
    )
    batches = Batches(dataset, settings.batch_size, seed=settings.seed)
    model = AriaForConditionalGeneration.from_pretrained(model_path, dtype=settings.dtype, mesh=mesh)
    config, dtype = model.config, model.dtype

    adapters = None
    if train_config.lora is not None:
        adapters = init_adapters(model.params, train_config.lora, jax.random.key(settings.seed))
        if mesh is not None:
            adapters = jax.tree.map(functools.partial(replicate_to, mesh), adapters)
    trainable, frozen = split_params(model.params, train_config, adapters)
    state = init_state(trainable, train_config)

    os.makedirs(out_dir, exist_ok=True)
    checkpoints_dir = os.path.abspath(os.path.join(out_dir, "checkpoints"))
    # A save cut short by a kill leaves a temporary directory; the next run removes it.
    manager = ocp.CheckpointManager(
        checkpoints_dir,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=settings.keep_checkpoints, enable_async_checkpointing=False, cleanup_tmp_directories=True
        ),
    )
    try:
        identity = _run_identity(model_path, data_dir, train_config, settings)
        resumed_from = manager.latest_step()
        if resumed_from is not None:
            # The settings first: the state restored with other shapes (another LoRA rank) fails
            # inside orbax, with a message that does not say why.
            saved = manager.restore(resumed_from, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            _check_resumable(saved["identity"], identity, checkpoints_dir)
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
            state = manager.restore(resumed_from, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))[
                "state"
            ]

        def save(step: int) -> None:
            meta = {
                "identity": identity,
                "step": step,
                "data_position": step * train_config.grad_accum_steps,
            }  # batches consumed
            manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )

        metrics_path = os.path.join(out_dir, "metrics.jsonl")
        start = int(state.step)
        _truncate_metrics(metrics_path, start)
        step_fn = jit_train_step(config, train_config, dtype)
        schedule = learning_rate_schedule(train_config)
        run_metrics = []

        def host_batch(step: int) -> dict:
            first = step * train_config.grad_accum_steps
            return stack_micro_batches([batches.batch(first + i) for i in range(train_config.grad_accum_steps)])

        # The next step's batch is read and preprocessed in a thread while this step computes.
        with (
            tqdm(
                total=train_config.total_steps,
                initial=start,
                disable=not progress,
                desc="finetune",
                unit="step",
                dynamic_ncols=True,
            ) as bar,
            open(metrics_path, "a", encoding="utf-8") as log,
            ThreadPoolExecutor(max_workers=1) as loader,
        ):
            upcoming = loader.submit(host_batch, start) if start < end_step else None
            for step in range(start, end_step):
                micro = upcoming.result()
                if step + 1 < end_step:
                    upcoming = loader.submit(host_batch, step + 1)
                began = time.perf_counter()
                if mesh is None:
                    state, metrics = step_fn(state, frozen, micro)
                else:
                    with jax.set_mesh(mesh):
                        state, metrics = step_fn(state, frozen, batch_to_mesh(micro, mesh))
                metrics = {key: float(value) for key, value in jax.device_get(metrics).items()}
                diverged = [
                    f"{key} {metrics[key]}"
                    for key in ("loss", "grad_norm", "param_norm")
                    if not math.isfinite(metrics[key])
                ]
                if diverged:
                    newest = manager.latest_step()
                    raise TrainingDivergedError(
                        f"training diverged at step {step + 1} ({', '.join(diverged)}); nothing of it is saved "
                        f"(newest checkpoint in {checkpoints_dir}: {'none' if newest is None else f'step {newest}'}); "
                        f"lower the learning rate or check the data"
                    )
                seconds = time.perf_counter() - began
                metrics.update(
                    step=step + 1,
                    learning_rate=float(schedule(step)),
                    seconds=seconds,
                    tokens_per_second=metrics["tokens"] / seconds,
                )
                run_metrics.append(metrics)
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                pause_point(f"finetune:logged-step-{step + 1}")
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_second']:.0f}")
                if (step + 1) % settings.save_every == 0 or step + 1 == end_step:
                    save(step + 1)
                    pause_point(f"finetune:saved-step-{step + 1}")
        manager.wait_until_finished()
    finally:  # an open manager's threads fail at interpreter exit, after the error message
        # close() does not wait for the removal of temporary directories that the constructor
        # started in a thread (a save would have): a run refused before its first save exits
        # while that thread still runs, and orbax logs its failure to stderr.
        cleanup = getattr(manager, "_cleanup_tmp_directory_future", None)
        if cleanup is not None:
            cleanup.result()
        manager.close()

    steps_done = int(state.step)
    model_dir = os.path.join(out_dir, "model")
    adapter_dir = os.path.join(out_dir, "adapter") if train_config.lora is not None else None
    if steps_done == train_config.total_steps:
        pause_point("finetune:before-final-model")
        params = merged_params(state.trainable, frozen)
        if train_config.lora is not None:
            save_adapters(state.trainable["lora"], train_config.lora, adapter_dir, overwrite=True)
            params = merge_adapters(params, state.trainable["lora"], train_config.lora)
        save_model_directory(params, config, model_dir, side_files_from=model_path, overwrite=True)
    return FinetuneResult(steps_done, resumed_from, run_metrics, model_dir, adapter_dir)


def _truncate_metrics(path: str, step: int) -> None:
    """Drops logged steps after `step` (a resumed run logs them again) and a last line that a kill
    cut short; any other line that is not a step's record is an error naming it."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        logged = _logged_step(line)
        if logged is None and line.strip():
            if number == len(lines):
                break
            raise ResumeError(
                f"{path} line {number} is not a metrics record: {line[:80]!r}; repair or delete the file to resume"
            )
        if logged is not None and logged <= step:
            kept.append(line + "\n")
    if "".join(kept) != text:
        # Rewritten beside and renamed over: a kill here leaves the old log or the new one.
        partial = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
        with open(partial, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(partial, path)


def _logged_step(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    logged = record.get("step") if isinstance(record, dict) else None
    return logged if isinstance(logged, int) and not isinstance(logged, bool) else None
