"""Training (`aria_jax.train`) against transformers' PyTorch Aria and against itself:
- the loss and every gradient equal transformers' (`labels=` and autograd) on two tiny configs;
- the router losses equal a numpy transcription of their definitions, on transformers' router
  logits, and enter the loss with their coefficients;
- gradient accumulation, remat and a (data, expert) mesh give the one-batch, one-device step;
- freezing keeps components out of the trained state; 30 steps on one batch halve its loss.

Both sides load one `save_pretrained` directory per config (tests/tiny_models.py): transformers
in float32 with eager experts, on one torch thread; ours in float32. The mesh runs in a
subprocess with 8 fake CPU devices (tests/train_mesh_worker.py), started with the first model so
that it runs while the other tests do. Compilation is most of the time: each `loss_and_grads` is
compiled once per (config, train config) and batch shape, and tests share them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

import aria_jax
from aria_jax import train
from aria_jax.export import save_hub_weights
from tiny_models import make_multimodal_model

import train_mesh_worker as worker
from worker_jobs import Job
from train_mesh_worker import IMAGE, IMAGE_TOKEN_ID, make_batch, on_host

NO_ROUTER_LOSSES = train.TrainConfig(z_loss_coeff=0.0, aux_loss_coeff=0.0)
ROUTER_LOSSES = train.TrainConfig(z_loss_coeff=1e-3, aux_loss_coeff=1e-2)
MESH_TIMEOUT = 300  # seconds; the worker takes ~30 s alone


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    model: dict  # make_multimodal_model keyword arguments
    crop_side: int
    tokens_per_crop: int  # the projector's queries for a crop_side crop
    padding: str  # the side the parity batch's shorter row is padded on


CONFIGS = {
    # tiny_models defaults: 2 layers, 4 heads, top-2 of 4 experts; 28-px crops of 4 patches.
    "default": TinyConfig({}, crop_side=28, tokens_per_crop=4, padding="right"),
    # GQA 6/2 heads, 3 layers, top-3 of 6 experts, 1 shared expert; 56-px crops of 16 patches
    # through 2 vision layers of 3 heads.
    "gqa_top3": TinyConfig(
        dict(
            vision_overrides=dict(
                hidden_size=24, num_attention_heads=3, num_hidden_layers=2, intermediate_size=40, image_size=56
            ),
            projector_patch_to_query={4: 3, 16: 5},
            hidden_size=48,
            intermediate_size=24,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            moe_num_experts=6,
            moe_topk=3,
            moe_num_shared_experts=1,
        ),
        crop_side=56,
        tokens_per_crop=5,
        padding="left",
    ),
}
# Two rows with images, two in the first; the second is shorter, so padded. Labelled: the answers.
PARITY_ROWS = [([3, IMAGE, 2, IMAGE, 4], 6), ([2, IMAGE, 3], 4)]
# transformers' only parameters without a gradient: Aria never uses the vision post_layernorm.
UNUSED_PARAMETERS = {"model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"}


@dataclasses.dataclass
class Tiny:
    name: str
    directory: str
    tiny_config: TinyConfig
    config: aria_jax.AriaConfig
    params: dict
    batch: dict  # the parity batch
    reference: dict  # transformers' loss, grads and router logits on it
    compiled: dict = dataclasses.field(default_factory=dict)  # train config -> jitted loss_and_grads


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's and XLA's threads would oversubscribe a small machine
    yield
    torch.set_num_threads(threads)


def transformers_reference(directory: str, batch: dict) -> dict:
    """transformers' loss (`labels=`), autograd's gradient of it per parameter name (None where
    unused) and the routers' logits (layers, B*T, E)."""
    model = transformers.AriaForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32, experts_implementation="eager"
    )
    mask = batch["attention_mask"].astype(np.int64)
    out = model(
        input_ids=torch.from_numpy(batch["input_ids"].astype(np.int64)),
        attention_mask=torch.from_numpy(mask),
        # transformers does not derive positions from the mask; ours does.
        position_ids=torch.from_numpy(np.maximum(np.cumsum(mask, axis=-1) - 1, 0)),
        pixel_values=torch.from_numpy(batch["pixel_values"]),
        pixel_mask=torch.from_numpy(batch["pixel_mask"]),
        labels=torch.from_numpy(batch["labels"].astype(np.int64)),
        output_router_logits=True,
    )
    out.loss.backward()
    return {
        "loss": out.loss.item(),
        "grads": {name: None if p.grad is None else p.grad.numpy() for name, p in model.named_parameters()},
        "router_logits": np.stack([logits.detach().numpy() for logits in out.router_logits]),
    }


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """name -> Tiny, each config built once per module."""
    built: dict[str, Tiny] = {}

    def get(name: str) -> Tiny:
        if name not in built:
            cfg = CONFIGS[name]
            directory = str(tmp_path_factory.mktemp(name))
            make_multimodal_model(directory, seed=list(CONFIGS).index(name), **cfg.model)
            model = aria_jax.AriaForConditionalGeneration.from_pretrained(directory)
            batch = make_batch(
                0, PARITY_ROWS, crop_side=cfg.crop_side, tokens_per_crop=cfg.tokens_per_crop, padding=cfg.padding
            )
            built[name] = Tiny(
                name, directory, cfg, model.config, model.params, batch, transformers_reference(directory, batch)
            )
        return built[name]

    return get


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request, build, mesh_worker) -> Tiny:
    return build(request.param)


@pytest.fixture(scope="module")
def default(build, mesh_worker) -> Tiny:
    return build("default")


@pytest.fixture(scope="module")
def mesh_worker(build, tmp_path_factory):
    """Started as soon as a test needs a model (`tiny`, `default`), so that it runs while the
    tests do."""
    job = Job(
        "mesh", os.path.abspath(worker.__file__), [build("default").directory], 8, str(tmp_path_factory.mktemp("mesh"))
    )
    yield job
    job.kill()


# ----------------------------------------------------------------------------- helpers


def loss_and_grads(tiny: Tiny, train_config: train.TrainConfig, batches: dict) -> tuple[dict, dict]:
    """`train.loss_and_grads` (jitted once per model and train config) on micro-batches
    (A, B, ...): metrics as floats, grads as numpy arrays."""
    if train_config not in tiny.compiled:
        tiny.compiled[train_config] = jax.jit(
            functools.partial(train.loss_and_grads, config=tiny.config, train_config=train_config)
        )
    trainable, frozen = train.split_params(tiny.params, train_config)
    metrics, grads = tiny.compiled[train_config](trainable, frozen, batches)
    return jax.tree.map(float, metrics), jax.tree.map(np.asarray, grads)


def one_micro_batch(batch: dict) -> dict:
    return train.stack_micro_batches([batch])


def fresh_trainable(tiny: Tiny, train_config: train.TrainConfig) -> tuple[dict, dict]:
    """(trainable, frozen), the trainable part copied: train steps donate it, and the params are
    shared by the module's tests."""
    trainable, frozen = train.split_params(tiny.params, train_config)
    return jax.tree.map(jnp.copy, trainable), frozen


def assert_grads_close(grads: dict, expected: dict, tolerance: float) -> None:
    """max |grads - expected| <= tolerance x the largest gradient, for every tensor. The scale is
    the largest gradient, not each tensor's own: float32 gets the vision tower's gradients
    (~1e-2 of the largest) right only to ~1e-5 of their own size (float64 says so), and
    accumulation, remat or a mesh round differently."""
    grads, expected = on_host(grads), on_host(expected)
    assert grads.keys() == expected.keys()
    scale = max(float(np.abs(g).max()) for g in expected.values())
    diffs = {path: float(np.abs(grads[path] - g).max()) for path, g in expected.items()}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= tolerance * scale, f"{worst}: max |diff| {diffs[worst]:.3g}, largest gradient {scale:.3g}"


def numpy_router_losses(router_logits: np.ndarray, token_mask: np.ndarray, top_k: int) -> tuple[float, float]:
    """rhymes-ai Aria moe_lm.py, each layer's then summed, over the T tokens of mask 1:
    z-loss = mean_t logsumexp(logits_t)^2; switch balance = E / (T K) sum_e mean_t p_te count_e,
    p = softmax(logits), count_e = how many top-K picks are e."""
    z_loss = balance = 0.0
    for logits in router_logits.astype(np.float64):
        logits = logits[token_mask.reshape(-1).astype(bool)]
        num_tokens, num_experts = logits.shape
        peak = logits.max(axis=-1, keepdims=True)
        logsumexp = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
        z_loss += np.mean(logsumexp**2)
        probs = np.exp(logits - logsumexp[:, None])
        counts = np.bincount(np.argsort(-logits, axis=-1)[:, :top_k].ravel(), minlength=num_experts)
        balance += num_experts / (num_tokens * top_k) * np.sum(probs.mean(axis=0) * counts)
    return z_loss, balance


# ----------------------------------------------------------------------------- parity with transformers


def test_parity_batch_has_what_the_tests_claim(tiny):
    """Two rows, images in both (two in the first), one row padded, the prompts and the padding
    unlabelled, and some patches masked: what the parity tests below rely on."""
    batch, cfg = tiny.batch, tiny.tiny_config
    image_tokens = (batch["input_ids"] == IMAGE_TOKEN_ID).sum(axis=1)
    assert (image_tokens // cfg.tokens_per_crop).tolist() == [2, 1]
    assert len(batch["pixel_values"]) == 3
    padded_column = 0 if cfg.padding == "left" else -1
    assert batch["attention_mask"][:, padded_column].tolist() == [1, 0]
    labelled = batch["labels"] != train.IGNORE_INDEX
    assert not (labelled & (batch["attention_mask"] == 0)).any()
    assert not labelled[batch["input_ids"] == IMAGE_TOKEN_ID].any()
    assert labelled.sum(axis=1).tolist() == [answer for _, answer in PARITY_ROWS]
    assert not batch["pixel_mask"].all() and batch["pixel_mask"][0].all()


def test_loss_matches_transformers(tiny):
    """Our cross-entropy over the labelled tokens (shifted by one, -100 ignored) is
    transformers' `labels=` loss; without router losses it is the whole loss."""
    metrics, _ = loss_and_grads(tiny, NO_ROUTER_LOSSES, one_micro_batch(tiny.batch))
    expected = tiny.reference["loss"]
    assert metrics["ce_loss"] == pytest.approx(expected, rel=1e-5, abs=0)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5, abs=0)
    assert metrics["labelled_tokens"] == (tiny.batch["labels"][:, 1:] != train.IGNORE_INDEX).sum()


def test_grads_match_transformers(tiny, tmp_path):
    """Every gradient of every component equals autograd's, per tensor
    max |ours - torch| <= 1e-4 max |torch|. Ours are written as a hub checkpoint, which
    transformers loads: its parameters are then our gradients under its own names."""
    _, grads = loss_and_grads(tiny, NO_ROUTER_LOSSES, one_micro_batch(tiny.batch))
    save_hub_weights(grads["params"], tiny.config, str(tmp_path))
    shutil.copy(os.path.join(tiny.directory, "config.json"), tmp_path)
    loaded, info = transformers.AriaForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    ours = {name: p.detach().numpy() for name, p in loaded.named_parameters()}

    expected = tiny.reference["grads"]
    assert {name for name, grad in expected.items() if grad is None} == UNUSED_PARAMETERS
    largest = max(np.abs(grad).max() for grad in expected.values() if grad is not None)
    failures = []
    for name, grad in expected.items():
        if grad is None:
            continue
        scale, diff = np.abs(grad).max(), np.abs(ours[name] - grad).max()
        if name.endswith("self_attn.k_proj.bias"):
            # Attention ignores the key bias (it adds q.b to every key's score alike): its
            # gradient is rounding noise on both sides.
            ok = max(scale, np.abs(ours[name]).max()) <= 1e-6 * largest
        else:
            ok = diff <= 1e-4 * scale and scale > 1e-6 * largest
        if not ok:
            failures.append(f"{name}: max |diff| {diff:.3g}, max |torch| {scale:.3g}")
    assert not failures, "\n".join(failures)


def test_router_losses_match_their_definitions(tiny):
    """The z-loss and balance metrics are the numpy definitions on transformers' router logits,
    over the attended tokens only: our routers see the same logits (the sown intermediates),
    and `router_losses` is the formula."""
    metrics, _ = loss_and_grads(tiny, NO_ROUTER_LOSSES, one_micro_batch(tiny.batch))
    z_loss, balance = numpy_router_losses(
        tiny.reference["router_logits"], tiny.batch["attention_mask"], tiny.config.text_config.moe_topk
    )
    assert metrics["z_loss"] == pytest.approx(z_loss, rel=1e-5)
    assert metrics["balance_loss"] == pytest.approx(balance, rel=1e-5)


def test_balance_loss_is_one_per_layer_when_experts_are_picked_equally():
    """When every expert is picked T K / E times the balance loss is sum_e mean_t p_te = 1 per
    layer, whatever the probabilities; masked tokens do not count, though they would unbalance
    the picks."""
    num_experts, top_k = 4, 2
    logits = np.full((6, num_experts), -1.0, np.float32)
    for token in range(4):  # token t picks experts t and t + 1 (mod 4): each expert twice
        logits[token, token] = 2.0 + 0.3 * token
        logits[token, (token + 1) % num_experts] = 1.0
    logits[4:, :2] = [3.0, 2.5]  # masked out: would pick experts 0 and 1 again
    router_logits = np.stack([logits, 0.5 * logits])  # two layers, different probabilities
    token_mask = np.array([1, 1, 1, 1, 0, 0])
    z_loss, balance = jax.jit(train.router_losses, static_argnums=2)(router_logits, token_mask, top_k)
    assert float(balance) == pytest.approx(2.0, rel=1e-6)
    expected_z, expected_balance = numpy_router_losses(router_logits, token_mask, top_k)
    assert expected_balance == pytest.approx(2.0, rel=1e-12)
    assert float(z_loss) == pytest.approx(expected_z, rel=1e-6)


def test_router_losses_are_added_with_their_coefficients(default):
    """With coefficients, the loss is the cross-entropy + z_coeff x z-loss + aux_coeff x balance
    loss (the numpy values), and the router losses reach the routers' gradients."""
    batches = one_micro_batch(default.batch)
    plain, plain_grads = loss_and_grads(default, NO_ROUTER_LOSSES, batches)
    metrics, grads = loss_and_grads(default, ROUTER_LOSSES, batches)
    z_loss, balance = numpy_router_losses(
        default.reference["router_logits"], default.batch["attention_mask"], default.config.text_config.moe_topk
    )
    assert metrics["ce_loss"] == pytest.approx(plain["ce_loss"], rel=1e-6)
    expected = plain["ce_loss"] + ROUTER_LOSSES.z_loss_coeff * z_loss + ROUTER_LOSSES.aux_loss_coeff * balance
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    router, plain_router = (g["params"]["language_model"]["layers"]["mlp"]["router"] for g in (grads, plain_grads))
    assert np.abs(router - plain_router).max() > 1e-2 * np.abs(plain_router).max()


# ----------------------------------------------------------------------------- the step against itself


def one_row_micro_batches(batch: dict, tokens_per_crop: int) -> list[dict]:
    """Each row of a right-padded batch as its own micro-batch: trimmed to its length (so the
    micro-batches differ in length), with its own crops, then blank crops up to the largest
    crop count (micro-batches stack)."""
    crops = (batch["input_ids"] == IMAGE_TOKEN_ID).sum(axis=1) // tokens_per_crop
    first_crops = np.cumsum(crops) - crops
    micro_batches = []
    for row, (first, count, length) in enumerate(zip(first_crops, crops, batch["attention_mask"].sum(axis=1))):
        blank = crops.max() - count
        pixel_values = batch["pixel_values"][first : first + count]
        pixel_mask = batch["pixel_mask"][first : first + count]
        micro_batches.append(
            {
                **{key: batch[key][row : row + 1, :length] for key in ("input_ids", "attention_mask", "labels")},
                "pixel_values": np.concatenate([pixel_values, np.zeros((blank,) + pixel_values.shape[1:], np.float32)]),
                "pixel_mask": np.concatenate([pixel_mask, np.ones((blank,) + pixel_mask.shape[1:], bool)]),
            }
        )
    return micro_batches


def test_gradient_accumulation_equals_one_batch(default):
    """The parity batch's two rows as two micro-batches (different lengths and label counts, the
    second with a blank crop) give the loss and grads of the batch: each micro-batch's
    cross-entropy is weighted by its share of the labelled tokens."""
    micro_batches = one_row_micro_batches(default.batch, default.tiny_config.tokens_per_crop)
    assert micro_batches[0]["input_ids"].shape[1] > micro_batches[1]["input_ids"].shape[1]
    stacked = train.stack_micro_batches(micro_batches)
    # The stacked rows, side by side, are the batch again (but for the ids under padding,
    # which nothing reads): the same inputs, cut differently.
    mask = default.batch["attention_mask"]
    np.testing.assert_array_equal(stacked["attention_mask"][:, 0], mask)
    np.testing.assert_array_equal(stacked["labels"][:, 0], default.batch["labels"])
    np.testing.assert_array_equal(stacked["input_ids"][:, 0] * mask, default.batch["input_ids"] * mask)
    accumulated, accumulated_grads = loss_and_grads(default, NO_ROUTER_LOSSES, stacked)
    whole, whole_grads = loss_and_grads(default, NO_ROUTER_LOSSES, one_micro_batch(default.batch))
    assert accumulated["labelled_tokens"] == whole["labelled_tokens"]
    assert accumulated["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert_grads_close(accumulated_grads, whole_grads, 1e-5)


def test_remat_changes_nothing(default):
    """remat=True (recomputing layer activations in the backward pass) gives remat=False's loss,
    router losses included, and grads. The grads to 1e-5 of the largest gradient, as for
    accumulation and the mesh, not 1e-6: the recomputed activations round differently (~2e-6
    here), and float32 gets these grads only to ~3e-6 (float64 differs from either run by more
    than they differ from each other)."""
    batches = one_micro_batch(default.batch)
    plain, plain_grads = loss_and_grads(default, ROUTER_LOSSES, batches)
    remat, remat_grads = loss_and_grads(default, dataclasses.replace(ROUTER_LOSSES, remat=True), batches)
    for name in ("loss", "z_loss", "balance_loss"):
        assert remat[name] == pytest.approx(plain[name], rel=1e-6), name
    assert_grads_close(remat_grads, plain_grads, 1e-5)


FREEZE_FLAGS = {
    "freeze_vision": "vision_tower",
    "freeze_projector": "multi_modal_projector",
    "freeze_language_model": "language_model",
}


@pytest.mark.parametrize("flag", list(FREEZE_FLAGS))
def test_a_frozen_component_is_outside_the_trained_state(default, flag):
    """The frozen component is in neither the trained params nor the optimizer's moments."""
    train_config = train.TrainConfig(**{flag: True})
    trainable, frozen = train.split_params(default.params, train_config)
    assert set(frozen) == {FREEZE_FLAGS[flag]} and trainable["lora"] == {}
    assert set(trainable["params"]) == set(train.COMPONENTS) - {FREEZE_FLAGS[flag]}
    moments = optax.tree_utils.tree_get(train.init_state(trainable, train_config).opt_state, "mu")
    assert set(moments["params"]) == set(trainable["params"])


def test_a_step_changes_only_the_trained_params(default):
    """Vision tower and projector frozen: one jitted step changes every language-model param
    and leaves the frozen ones as they were, which still take part in the loss."""
    train_config = dataclasses.replace(NO_ROUTER_LOSSES, learning_rate=1e-3, freeze_vision=True, freeze_projector=True)
    trainable, frozen = fresh_trainable(default, train_config)
    assert set(trainable["params"]) == {"language_model"}
    before, frozen_before = on_host(trainable), on_host(frozen)
    state, metrics = train.jit_train_step(default.config, train_config)(
        train.init_state(trainable, train_config), frozen, one_micro_batch(default.batch)
    )
    after = on_host(state.trainable)
    assert after.keys() == before.keys()
    assert [path for path in after if np.array_equal(after[path], before[path])] == []
    for path, value in on_host(frozen).items():
        np.testing.assert_array_equal(value, frozen_before[path], err_msg=path)
    assert metrics["loss"] == pytest.approx(default.reference["loss"], rel=1e-5)


def test_nothing_to_train_is_an_error():
    """All three components frozen without LoRA adapters: refused when configured, not at step 1."""
    with pytest.raises(ValueError, match="nothing to train"):
        train.TrainConfig(freeze_vision=True, freeze_projector=True, freeze_language_model=True)


def test_thirty_steps_halve_the_loss_of_one_batch(default):
    """The jitted step learns: 30 steps (lr 1e-2, cosine to 0) on one batch at least halve its loss."""
    train_config = train.TrainConfig(learning_rate=1e-2, total_steps=30)
    trainable, frozen = fresh_trainable(default, train_config)
    state = train.init_state(trainable, train_config)
    step = train.jit_train_step(default.config, train_config)
    batches = one_micro_batch(default.batch)
    losses = []
    for _ in range(30):
        state, metrics = step(state, frozen, batches)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 30
    assert losses[-1] <= 0.5 * losses[0], losses


# ----------------------------------------------------------------------------- a mesh


@pytest.fixture(scope="module")
def mesh_result(mesh_worker) -> dict:
    result = mesh_worker.result(MESH_TIMEOUT)
    assert result["device_count"] == 8
    return result


def test_mesh_splits_rows_and_experts(mesh_result):
    """data=2 x expert=2 on 4 of the 8 devices: each device holds one of the 4 rows of each
    micro-batch and 2 of the 4 experts, so the batch-parallel and expert-parallel paths ran."""
    assert mesh_result["mesh"] == {"data": 2, "expert": 2, "tensor": 1}
    ids, experts = mesh_result["placement"]["input_ids"], mesh_result["placement"]["experts_gate_up"]
    assert ids["shape"][:2] == [2, 4] and ids["shard_shapes"] == [[2, 1, ids["shape"][2]]] * 4
    assert experts["shape"][1] == 4 and [shape[1] for shape in experts["shard_shapes"]] == [2] * 4


def test_mesh_loss_and_grads_match_one_device(mesh_result):
    """`loss_and_grads` on the mesh (2 micro-batches, router losses on) gives the one-device
    metrics and grads: max |diff| <= 1e-5 x the largest gradient (see assert_grads_close)."""
    for name, (one_device, on_mesh) in mesh_result["metrics"].items():
        assert on_mesh == pytest.approx(one_device, rel=1e-5), name
    scale = max(reference for _, reference in mesh_result["grads"].values())
    worst = max(mesh_result["grads"], key=lambda path: mesh_result["grads"][path][0])
    assert mesh_result["grads"][worst][0] <= 1e-5 * scale, (worst, mesh_result["grads"][worst], scale)


def test_mesh_train_step_matches_one_device(mesh_result):
    """One `jit_train_step` on the mesh gives the one-device metrics and params: per tensor,
    |mesh - one device| <= 1e-5 |params| (2-norms), while the step moved each by far more."""
    for name, (one_device, on_mesh) in mesh_result["step_metrics"].items():
        assert on_mesh == pytest.approx(one_device, rel=1e-5), name
    for path, (diff, norm, update) in mesh_result["params"].items():
        assert diff <= 1e-5 * norm, (path, diff, norm)
        if not path.endswith("self_attn/k_proj/bias"):  # its gradient is rounding noise
            assert update >= 10 * 1e-5 * norm, (path, update, norm)
