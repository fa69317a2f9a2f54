"""Training: the loss, the optimizer and one jitted step, on one device or a mesh.

The loss is Aria's fine-tuning objective (rhymes-ai/Aria `aria/train.py`, `moe_lm.py`):
- next-token cross-entropy over the labelled tokens only (labels -100 elsewhere: user turns,
  the `<|im_start|>assistant\\n` prefix, image tokens, padding; see `aria_jax.data`);
- the routers' z-loss, coefficient x mean over tokens of logsumexp(router logits)^2;
- the switch load-balancing loss, coefficient x E / (T K) x sum_e mean_t(p_te) x count_e, where
  p = softmax over all E router logits and count_e = how many of the T tokens' top-K picks are e
  (1 x coefficient when routing is uniform).
Both router losses are summed over layers, as the original adds each layer's; unlike the
original, padding tokens are left out of them.

Parameters split into the trained and the frozen: freezing a component (vision tower,
projector, language model), or training LoRA adapters only (`aria_jax.lora`), keeps the frozen
part out of the gradient and the optimizer state. Gradient accumulation runs the micro-batches
in a `lax.scan` and weights each by its share of the labelled tokens, so the step equals one
step on the whole batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from aria_jax.config import AriaConfig
from aria_jax.lora import LoraConfig, scaled_adapters
from aria_jax.modeling import AriaModel
from aria_jax.sharding import mesh_axis_size
from aria_jax.weights import COMPONENTS

IGNORE_INDEX = -100


class TrainConfigError(ValueError):
    """A training setting of the wrong type or out of its range; the message names it and its value."""


def check_setting(owner: str, name: str, value, requirement: str, ok, integer: bool = False) -> None:
    """Raises TrainConfigError unless `value` is an integer (or a finite number) for which `ok`
    holds; `requirement` says what `ok` asks, for the message."""
    kind = numbers.Integral if integer else numbers.Real
    valid = isinstance(value, kind) and not isinstance(value, bool)
    if valid and not integer:
        try:
            valid = math.isfinite(value)
        except OverflowError:  # an int beyond any float
            valid = False
    if not (valid and ok(value)):
        shown = value if isinstance(value, numbers.Number) else repr(value)
        raise TrainConfigError(
            f"{owner}.{name}={shown} must be {'an integer' if integer else 'a finite number'} {requirement}"
        )


# Beyond these, a step's arithmetic breaks: adam_b1 or adam_b2 of 1 divides by zero in the bias
# correction, adam_eps of 0 makes 0 / 0 for a weight whose gradient is always 0.
_FLOAT_RANGES = {
    "learning_rate": ("> 0", lambda x: x > 0),
    "weight_decay": (">= 0", lambda x: x >= 0),
    "adam_b1": ("in [0, 1)", lambda x: 0 <= x < 1),
    "adam_b2": ("in [0, 1)", lambda x: 0 <= x < 1),
    "adam_eps": ("> 0", lambda x: x > 0),
    "max_grad_norm": (">= 0 (0 turns clipping off)", lambda x: x >= 0),
    "z_loss_coeff": (">= 0", lambda x: x >= 0),
    "aux_loss_coeff": (">= 0", lambda x: x >= 0),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    total_steps: int = 1000  # the cosine schedule reaches 0 here
    weight_decay: float = 0.1  # not on norms and biases
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 turns clipping off
    z_loss_coeff: float = 1e-5
    aux_loss_coeff: float = 1e-3
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    remat: bool = False  # recompute layer activations in the backward pass
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_language_model: bool = False
    lora: LoraConfig | None = None  # train adapters only; the base model is frozen

    def __post_init__(self):
        for name in ("total_steps", "grad_accum_steps"):
            check_setting("TrainConfig", name, getattr(self, name), "at least 1", lambda n: n >= 1, integer=True)
        check_setting(
            "TrainConfig",
            "warmup_steps",
            self.warmup_steps,
            f"in [0, total_steps={self.total_steps}]",
            lambda n: 0 <= n <= self.total_steps,
            integer=True,
        )
        for name, (requirement, ok) in _FLOAT_RANGES.items():
            check_setting("TrainConfig", name, getattr(self, name), requirement, ok)
        if self.lora is not None:
            if not isinstance(self.lora, LoraConfig):
                raise TrainConfigError(f"TrainConfig.lora={self.lora!r} must be a LoraConfig or None")
            # alpha scales every adapter's output: 0 would train nothing, NaN poisons the model.
            check_setting("TrainConfig", "lora.alpha", self.lora.alpha, "> 0", lambda x: x > 0)
        if self.lora is None and len(self.frozen_components) == len(COMPONENTS):
            raise TrainConfigError("every component is frozen and no LoRA adapters are trained: nothing to train")

    @property
    def frozen_components(self) -> tuple[str, ...]:
        if self.lora is not None:
            return COMPONENTS
        frozen = {
            "vision_tower": self.freeze_vision,
            "multi_modal_projector": self.freeze_projector,
            "language_model": self.freeze_language_model,
        }
        return tuple(name for name in COMPONENTS if frozen[name])


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: dict  # {"params": the unfrozen components, "lora": adapters or {}}
    opt_state: Any


def split_params(params: dict, train_config: TrainConfig, adapters: dict | None = None) -> tuple[dict, dict]:
    """(trainable, frozen): trainable = {"params": unfrozen components, "lora": adapters}."""
    frozen_names = train_config.frozen_components
    trainable = {"params": {k: v for k, v in params.items() if k not in frozen_names}, "lora": adapters or {}}
    frozen = {k: v for k, v in params.items() if k in frozen_names}
    return trainable, frozen


def merged_params(trainable: dict, frozen: dict) -> dict:
    return {**frozen, **trainable["params"]}


# ----------------------------------------------------------------------------- loss


def cross_entropy_sum(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy of logits (B, T, V) against labels (B, T) shifted by one
    (position t predicts label t + 1, as transformers), and the number of labelled tokens."""
    logits, labels = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    labelled = labels != IGNORE_INDEX
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.where(labelled, labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(labelled, picked, 0.0)), jnp.sum(labelled)


def router_losses(router_logits: jax.Array, token_mask: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """router_logits (layers, T, E), token_mask (T,) -> (z-loss, load-balancing loss), each
    summed over layers and uncoefficiented."""
    logits = router_logits.astype(jnp.float32)
    weight = token_mask.astype(jnp.float32)
    num_tokens = jnp.maximum(weight.sum(), 1.0)

    def masked_mean(x):  # over tokens, axis 1
        return jnp.einsum("lt...,t->l...", x, weight) / num_tokens

    z_loss = masked_mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
    num_experts = logits.shape[-1]
    mean_probs = masked_mean(jax.nn.softmax(logits, axis=-1))  # (L, E)
    _, top_ids = jax.lax.top_k(logits, top_k)
    picks = jnp.einsum("ltke,t->le", jax.nn.one_hot(top_ids, num_experts), weight)  # (L, E)
    balance = num_experts / (num_tokens * top_k) * jnp.sum(mean_probs * picks, axis=-1)
    return z_loss.sum(), balance.sum()


def loss_terms(
    trainable: dict, frozen: dict, batch: dict, *, config: AriaConfig, train_config: TrainConfig, dtype=jnp.float32
) -> dict[str, jax.Array]:
    """One (micro-)batch: summed cross-entropy, labelled-token count, and the router losses."""
    variables = {"params": merged_params(trainable, frozen)}
    if trainable["lora"]:
        variables["lora"] = scaled_adapters(trainable["lora"], train_config.lora)
    model = AriaModel(config, dtype=dtype, param_dtype=dtype, remat=train_config.remat)
    logits, state = model.apply(
        variables,
        batch["input_ids"],
        batch["attention_mask"],
        None,
        batch.get("pixel_values"),
        batch.get("pixel_mask"),
        mutable=["intermediates"],
    )
    ce_sum, num_labelled = cross_entropy_sum(logits, batch["labels"])
    (router_logits,) = state["intermediates"]["language_model"]["layers"]["mlp"]["router_logits"]
    z_loss, balance = router_losses(router_logits, batch["attention_mask"].reshape(-1), config.text_config.moe_topk)
    return {"ce_sum": ce_sum, "num_labelled": num_labelled, "z_loss": z_loss, "balance_loss": balance}


def total_loss(terms: dict, train_config: TrainConfig, num_labelled_total, num_micro_batches: int) -> jax.Array:
    """This micro-batch's share of the step's loss: its cross-entropy over the step's labelled
    tokens, and its router losses over the number of micro-batches."""
    router = train_config.z_loss_coeff * terms["z_loss"] + train_config.aux_loss_coeff * terms["balance_loss"]
    return terms["ce_sum"] / jnp.maximum(num_labelled_total, 1) + router / num_micro_batches


# ----------------------------------------------------------------------------- optimizer


def _decays(path, _) -> bool:
    name = str(getattr(path[-1], "key", path[-1]))
    return not (name == "scale" or name.endswith("bias"))


def learning_rate_schedule(train_config: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to 0 at total_steps."""
    return optax.warmup_cosine_decay_schedule(
        0.0, train_config.learning_rate, train_config.warmup_steps, train_config.total_steps, end_value=0.0
    )


def make_optimizer(train_config: TrainConfig) -> optax.GradientTransformation:
    """AdamW (no decay on norms and biases) on `learning_rate_schedule`, after gradient
    clipping by global norm."""
    adamw = optax.adamw(
        learning_rate_schedule(train_config),
        b1=train_config.adam_b1,
        b2=train_config.adam_b2,
        eps=train_config.adam_eps,
        weight_decay=train_config.weight_decay,
        mask=lambda tree: jax.tree_util.tree_map_with_path(_decays, tree),
    )
    if train_config.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train_config.max_grad_norm), adamw)
    return adamw


def init_state(trainable: dict, train_config: TrainConfig) -> TrainState:
    state = TrainState(
        step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=make_optimizer(train_config).init(trainable)
    )
    # Committed to where they are, as the step's outputs will be: the second step then reuses
    # the first one's executable instead of compiling another.
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding), state)


# ----------------------------------------------------------------------------- step


def loss_and_grads(
    trainable: dict, frozen: dict, batches: dict, *, config: AriaConfig, train_config: TrainConfig, dtype=jnp.float32
):
    """batches: arrays with a leading micro-batch axis (A, B, ...). Returns (metrics, grads) of
    the step's loss, accumulated over the micro-batches in a scan."""
    num_micro = batches["input_ids"].shape[0]
    num_labelled_total = jnp.sum(batches["labels"][:, :, 1:] != IGNORE_INDEX)

    def micro_loss(trainable, batch):
        terms = loss_terms(trainable, frozen, batch, config=config, train_config=train_config, dtype=dtype)
        return total_loss(terms, train_config, num_labelled_total, num_micro), terms

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, batch):
        loss_sum, grads_sum, terms_sum = carry
        (loss, terms), grads = grad_fn(trainable, batch)
        add = functools.partial(jax.tree.map, jnp.add)
        return (loss_sum + loss, add(grads_sum, grads), add(terms_sum, terms)), None

    zeros_terms = {
        "ce_sum": jnp.float32(0),
        "num_labelled": jnp.int32(0),
        "z_loss": jnp.float32(0),
        "balance_loss": jnp.float32(0),
    }
    carry = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable), zeros_terms)
    (loss, grads, terms), _ = jax.lax.scan(accumulate, carry, batches)
    metrics = {
        "loss": loss,
        "ce_loss": terms["ce_sum"] / jnp.maximum(terms["num_labelled"], 1),
        "z_loss": terms["z_loss"] / num_micro,
        "balance_loss": terms["balance_loss"] / num_micro,
        "labelled_tokens": terms["num_labelled"],
        "tokens": jnp.sum(batches["attention_mask"]),
    }
    return metrics, grads


def train_step(
    state: TrainState, frozen: dict, batches: dict, *, config: AriaConfig, train_config: TrainConfig, dtype=jnp.float32
) -> tuple[TrainState, dict]:
    metrics, grads = loss_and_grads(
        state.trainable, frozen, batches, config=config, train_config=train_config, dtype=dtype
    )
    updates, opt_state = make_optimizer(train_config).update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    # Non-finite when some trained weight is (or past ~1e19, as good as diverged): a run checks it
    # before saving the state.
    metrics["param_norm"] = optax.tree.norm(trainable)
    return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


def jit_train_step(config: AriaConfig, train_config: TrainConfig, dtype=jnp.float32):
    """`train_step` compiled, with the state donated (updated in place)."""
    return jax.jit(
        functools.partial(train_step, config=config, train_config=train_config, dtype=dtype), donate_argnums=0
    )


def batch_to_mesh(batches: dict, mesh) -> dict:
    """Host micro-batches (A, B, ...), the same on every host, as global arrays on `mesh` with
    the rows (axis 1) split over the batch axes where they divide, else replicated."""
    row_axes = ("data", "expert")
    split = math.prod(mesh_axis_size(mesh, axis) for axis in row_axes)

    def place(x):
        x = np.asarray(x)
        spec = P(None, row_axes) if x.shape[1] % split == 0 else P()
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])

    return {key: place(value) for key, value in batches.items()}


def stack_micro_batches(batches: list[dict]) -> dict:
    """Batches (numpy, from `aria_jax.data.Batches`) -> one dict with a leading micro-batch axis.
    Rows are right-padded to the longest batch; the padding is masked and unlabelled, so it
    changes nothing."""
    length = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}

    def padded(batch):
        return {
            key: np.pad(value, ((0, 0), (0, length - value.shape[1])), constant_values=fill[key])
            if key in fill
            else value
            for key, value in batch.items()
        }

    return {key: np.stack([padded(b)[key] for b in batches]) for key in batches[0]}
