"""The MoE feed-forward block: top-k router, routed SiLU-gated experts, always-on shared experts.

Routed experts have interchangeable implementations that tests hold to each other:
- `routed_experts_sorted`: dropless. The (token, slot) pairs are sorted by expert so each expert's
  rows are contiguous, then one grouped matmul (`jax.lax.ragged_dot`) per projection. Work is
  proportional to tokens x top-k on backends with a real grouped matmul (TPU, GPU); XLA:CPU
  lowers it to a dense matmul over every expert.
- `routed_experts_looped`: the same sorted rows, but a loop over the experts that holds rows,
  each running plain matmuls on blocks of its own rows: work proportional to the routed pairs
  on CPU, where matmuls are fast and `ragged_dot` is not.
- `routed_experts_gathered`: each (token, slot) multiplies by its own gathered expert weights;
  reads only the chosen experts, the fast path for decode (few tokens, many experts).
- `routed_experts_dense`: every expert on every token, combined with the routing weights. The
  reference: simple enough to check by eye.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from aria_jax.config import AriaTextConfig
from aria_jax.layers import ACTIVATIONS, adapted, default_kernel_init, param_with_axes
from aria_jax.sharding import mesh_axis_size


def route(x: jax.Array, router_kernel: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x: (T, D). Returns router logits (T, E), top-k weights (T, K) and expert ids (T, K).

    Experts are chosen on the raw logits; the weights are a softmax over the chosen logits only.
    """
    logits = jnp.einsum("td,de->te", x, router_kernel)
    top_logits, top_ids = jax.lax.top_k(logits, top_k)
    weights = jax.nn.softmax(top_logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    return logits, weights, top_ids


def _glu(gate_up: jax.Array) -> jax.Array:
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up


def routed_experts_dense(x, weights, expert_ids, gate_up, down):
    """x: (T, D); weights, expert_ids: (T, K); gate_up: (E, D, 2F); down: (E, F, D) -> (T, D)."""
    num_experts = gate_up.shape[0]
    activations = _glu(jnp.einsum("td,edf->tef", x, gate_up))
    expert_out = jnp.einsum("tef,efd->ted", activations, down)
    combine = jnp.einsum("tk,tke->te", weights, jax.nn.one_hot(expert_ids, num_experts, dtype=weights.dtype))
    return jnp.einsum("ted,te->td", expert_out, combine)


def routed_experts_sorted(x, weights, expert_ids, gate_up, down):
    """Same contract as `routed_experts_dense`; dropless sort + grouped matmul."""
    num_tokens, top_k = expert_ids.shape
    num_experts = gate_up.shape[0]
    flat_expert_ids = expert_ids.reshape(-1)                                  # (T*K,)
    order = jnp.argsort(flat_expert_ids, stable=True)                         # rows grouped by expert
    group_sizes = jnp.bincount(flat_expert_ids, length=num_experts).astype(jnp.int32)
    x_sorted = x[order // top_k]                                              # (T*K, D)
    activations = _glu(jax.lax.ragged_dot(x_sorted, gate_up, group_sizes))
    out_sorted = jax.lax.ragged_dot(activations, down, group_sizes)           # (T*K, D)
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted, unique_indices=True)
    return jnp.einsum("tkd,tk->td", out.reshape(num_tokens, top_k, -1), weights)


def routed_experts_gathered(x, weights, expert_ids, gate_up, down):
    """Same contract; gathers each (token, slot)'s expert weights. Reads only the chosen experts,
    so it suits decode, where tokens x top-k is small next to the number of experts. The slot
    stays a batch dimension of both matmuls: folding it into the output dimension makes XLA
    transpose the gathered weights, a second copy of them."""
    x_per_slot = jnp.broadcast_to(x[:, None, :], (*expert_ids.shape, x.shape[-1]))
    activations = _glu(jnp.einsum("tkd,tkdf->tkf", x_per_slot, gate_up[expert_ids]))
    out = jnp.einsum("tkf,tkfd->tkd", activations, down[expert_ids])
    return jnp.einsum("tkd,tk->td", out, weights)


# Row blocks of the looped backend. An expert's rows run as blocks of the largest, and a remainder
# as the smallest of these that holds it: few wasted rows, and few compiled matmul shapes.
LOOP_BLOCKS = (8, 16, 32, 64)


@jax.custom_vjp
def routed_experts_looped(x, weights, expert_ids, gate_up, down):
    """Same contract; sorted rows, then a loop over experts running dense matmuls on blocks of
    each expert's rows. Experts with no rows cost one loop test; padding rows of a block are
    rows of the next expert (or zeros at the end) whose results are overwritten or dropped.
    Loops of data-dependent length have no reverse mode, so gradients come from the sorted
    backend's (same values)."""
    num_tokens, top_k = expert_ids.shape
    num_experts, largest = gate_up.shape[0], LOOP_BLOCKS[-1]
    flat_expert_ids = expert_ids.reshape(-1)
    order = jnp.argsort(flat_expert_ids, stable=True)
    group_sizes = jnp.bincount(flat_expert_ids, length=num_experts).astype(jnp.int32)
    group_starts = jnp.cumsum(group_sizes) - group_sizes
    x_sorted = jnp.concatenate([x[order // top_k], jnp.zeros((largest, x.shape[-1]), x.dtype)])
    block_sizes = jnp.asarray(LOOP_BLOCKS)

    def one_expert(expert, out_sorted):
        start, end = group_starts[expert], group_starts[expert] + group_sizes[expert]

        def run_block(size):
            def run(row):
                y = _glu(jax.lax.dynamic_slice_in_dim(x_sorted, row, size) @ gate_up[expert]) @ down[expert]
                return jnp.pad(y, ((0, largest - size), (0, 0)))
            return run

        def next_block(carry):
            row, out_sorted = carry
            which = jnp.minimum(jnp.sum(block_sizes < end - row), len(LOOP_BLOCKS) - 1)   # smallest that holds them
            y = jax.lax.switch(which, [run_block(size) for size in LOOP_BLOCKS], row)
            return row + block_sizes[which], jax.lax.dynamic_update_slice_in_dim(out_sorted, y, row, 0)

        return jax.lax.while_loop(lambda carry: carry[0] < end, next_block, (start, out_sorted))[1]

    out_sorted = jax.lax.fori_loop(0, num_experts, one_expert, jnp.zeros_like(x_sorted))[:-largest]
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted, unique_indices=True)
    return jnp.einsum("tkd,tk->td", out.reshape(num_tokens, top_k, -1), weights)


def _looped_forward(x, weights, expert_ids, gate_up, down):
    return routed_experts_looped(x, weights, expert_ids, gate_up, down), (x, weights, expert_ids, gate_up, down)


def _looped_backward(saved, cotangent):
    x, weights, expert_ids, gate_up, down = saved
    _, vjp = jax.vjp(lambda x, w, gu, dn: routed_experts_sorted(x, w, expert_ids, gu, dn), x, weights, gate_up, down)
    d_x, d_weights, d_gate_up, d_down = vjp(cotangent)
    return d_x, d_weights, None, d_gate_up, d_down


routed_experts_looped.defvjp(_looped_forward, _looped_backward)


def routed_experts_auto(x, weights, expert_ids, gate_up, down):
    """Gathered weights for a few (token, slot) pairs (decode), else sorted rows: the looped
    backend on CPU, the grouped matmul elsewhere. On CPU a gather copies slowly, so from a few
    tokens on (batched decode) the looped backend is faster."""
    num_pairs, num_experts = expert_ids.size, gate_up.shape[0]
    on_cpu = jax.default_backend() == "cpu"
    if num_pairs < (num_experts // 4 if on_cpu else num_experts):
        return routed_experts_gathered(x, weights, expert_ids, gate_up, down)
    if on_cpu:
        return routed_experts_looped(x, weights, expert_ids, gate_up, down)
    return routed_experts_sorted(x, weights, expert_ids, gate_up, down)


def routed_experts_over_mesh(backend, x, weights, expert_ids, gate_up, down):
    """Expert parallelism over the current mesh's `expert` axis: each shard holds E/n experts
    and runs `backend` on the (token, slot) pairs routed to them; tokens are replicated over the
    axis and the shards' partial outputs summed with a psum. Dropless: pairs routed to another
    shard get weight 0 and the id one past the local experts, a group that the grouped matmul
    skips and that gathers clamp (their zero weight removes them)."""

    def local_experts(x, weights, expert_ids, gate_up, down):
        # x varies over the shards from here: JAX marks argsort's indices as the same on every
        # shard, so the sorted backend's x[order] would be transposed as psum-then-scatter with
        # one shard's order, a wrong gradient for x; varying, each shard scatters its own.
        x = jax.lax.pcast(x, "expert", to="varying")
        num_local = gate_up.shape[0]
        local_ids = expert_ids - jax.lax.axis_index("expert") * num_local
        here = (local_ids >= 0) & (local_ids < num_local)
        out = backend(x, jnp.where(here, weights, 0), jnp.where(here, local_ids, num_local), gate_up, down)
        # Summed in float32 and rounded once (XLA:CPU also cannot compile a bf16 all-reduce).
        return jax.lax.psum(out.astype(jnp.float32), "expert").astype(out.dtype)

    return jax.shard_map(
        local_experts, in_specs=(P(), P(), P(), P("expert"), P("expert")), out_specs=P(), axis_names={"expert"},
    )(x, weights, expert_ids, gate_up, down)


ROUTED_EXPERT_BACKENDS = {
    "dense": routed_experts_dense,
    "ragged_dot": routed_experts_sorted,
    "looped": routed_experts_looped,
    "gathered": routed_experts_gathered,
    "auto": routed_experts_auto,
}


class MoE(nn.Module):
    config: AriaTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        d, e, f, s = cfg.hidden_size, cfg.moe_num_experts, cfg.intermediate_size, cfg.shared_expert_size

        def weight(name, shape, axes, num_expert_dims=0):
            value = param_with_axes(self, name, default_kernel_init, shape, axes, self.param_dtype)
            return adapted(self, name, value.astype(self.dtype), num_expert_dims)

        router = weight("router", (d, e), ("embed", "experts_logits"))
        gate_up = weight("experts_gate_up", (e, d, 2 * f), ("experts", "embed", "expert_mlp"), num_expert_dims=1)
        down = weight("experts_down", (e, f, d), ("experts", "expert_mlp", "embed"), num_expert_dims=1)

        batch_shape = x.shape[:-1]
        tokens = x.reshape(-1, d)
        with jax.named_scope("router"):
            router_logits, top_weights, top_ids = route(tokens, router, cfg.moe_topk)
            # Kept only when the caller asks for "intermediates": training's auxiliary losses.
            self.sow("intermediates", "router_logits", router_logits)
        with jax.named_scope("routed_experts"):
            backend = ROUTED_EXPERT_BACKENDS[cfg.moe_backend]
            if mesh_axis_size(jax.sharding.get_abstract_mesh(), "expert") > 1:
                routed = routed_experts_over_mesh(backend, tokens, top_weights, top_ids, gate_up, down)
            else:
                routed = backend(tokens, top_weights, top_ids, gate_up, down)
        with jax.named_scope("shared_experts"):
            act = ACTIVATIONS[cfg.hidden_act]
            shared_gate = weight("shared_gate", (d, s), ("embed", "mlp"))
            shared_up = weight("shared_up", (d, s), ("embed", "mlp"))
            shared_down = weight("shared_down", (s, d), ("mlp", "embed"))
            hidden = act(jnp.einsum("td,ds->ts", tokens, shared_gate)) * jnp.einsum("td,ds->ts", tokens, shared_up)
            shared = jnp.einsum("ts,sd->td", hidden, shared_down)
        return (routed + shared).reshape(*batch_shape, d)
