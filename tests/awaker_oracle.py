"""A PyTorch oracle for Awaker2.5-VL's mixture of LoRA experts, on transformers' Qwen2-VL.

Awaker2.5-VL is Qwen2-VL with plain LoRA on q/k/v_proj and a mixture of LoRA experts on o_proj,
mlp.gate_proj, mlp.up_proj and mlp.down_proj of every decoder layer, routed once per sequence.
This module rebuilds that on a (tiny, random) transformers `Qwen2VLForConditionalGeneration`, so
that a JAX port can be compared with it: logits, generated tokens, the routing of every layer, and
a checkpoint in the released key layout.

The math, per decoder layer, with s = alpha / r (the release: r = 256, alpha = 512, s = 2.0),
experts "0".."E-1" (E = 4) and a general expert "g". `x` is the layer input (B, T, in), `W`, `b`
the base linear; every product below is in the dtype of its operands unless a cast is named.

q_proj, k_proj, v_proj (plain LoRA, adapter "default"):
    y = x W^T + b
    y += s * B (A x.to(A.dtype))           (in place, so the sum is stored in y's dtype)
    A and B are float32 even when the base is bfloat16: the adapter is created before the base
    weight is attached and only one adapter is ever added to these layers, so nothing casts them.

Gate input, one vector per sequence (row i, span [start_i, end_i) from `prompt_pos`):
    p_i = mean_{t in [start_i, end_i)} G[i, t, :]            (in G's dtype)
    G is the layer-0 input embeddings (token embeddings) of the sequence; which version is used
    depends on the step, see "Where the gate input comes from" below. Every router of every layer
    reads the same p: the routing is per layer and per sequence, never per token.

Routers, on o_proj and on gate_proj only (up_proj and down_proj use gate_proj's gates):
    n_i      = (q * rsqrt(mean(q^2) + 1e-6)).to(p.dtype) * ln.weight,   q = p_i.float()
    logits_i = w_gate(n_i) = n_i w_gate.weight^T + w_gate.bias                 (E values)
    probs_i  = softmax(logits_i.to(float16))      (gates_tmp = 1; result rounded to float16;
                                                   no noise at inference)
    e_i      = argmax probs_i (top-1),  w_i = probs_i[e_i]   (float16, NOT renormalised)
    gates_i  = one-hot(e_i) * w_i                                               (float16)

MoE-LoRA linear (o_proj, gate_proj, up_proj, down_proj):
    y      = x W^T (+ b)
    u_i    = s * B_e (A_e x_i)        e = e_i, computed in the adapter dtype
    ye_i   = (u_i * w_i).float()      the dispatcher: gate multiply (a float16 (N, 1, 1) tensor,
                                      so bfloat16 * float16 promotes to float32), then summed into
                                      a float32 zero tensor
    yg     = s * B_g (A_g x)          in the adapter dtype
    z      = ye * w + yg * (1 - w)    w the same float16 w_i again, (B, 1, 1); `1 - w` is computed
                                      in float16; both products promote to float32
    y     += z                        in place: back to y's dtype
    So y = x W^T + w^2 s B_e A_e x + (1 - w) s B_g A_g x: the chosen expert's weight enters
    squared (once in the dispatcher, once in the mix). The MoE adapters and the routers are in
    the base weight's dtype (adding the second expert casts the whole module to it).

Where the gate input comes from (greedy generation, as released):
    prefill (the prompt step): G = token embeddings of the prompt with the vision tower's image
        features written into the image-pad positions (what the decoder itself gets).
    every later step: G = token embeddings of all ids so far, with NO image substitution (the
        image positions keep the `<|image_pad|>` token's embedding; video features never enter
        G while generating). Only the span matters, and it lies in the prompt, so this p is the
        same at every later step.
    A forward outside generation (no ids history passed, e.g. training) uses the decoder's own
    input embeddings, image and video features included (for an image prompt that is the gate of
    `awaker_logits`; this oracle takes no video).
    The prompt's keys/values stay in the KV cache with the prefill's routing; the new tokens are
    computed with the later-step routing. For a text-only prompt the two inputs are equal.
    `gate="image_features"` uses the prefill input at every step instead: a deviation from the
    release, which its code comment there (run the vision tower the first time only and keep the
    result) suggests was the intent.

prompt_pos, per row of the (left-padded) batch, indices in the padded row:
    start = index of the first `<|vision_start|>` when the row has an image, else (index of the
            second `<|im_start|>`) + 2;
    end   = index of the second `<|im_end|>`.
    With the default system prompt the span is the user turn (from the image on, or after
    "user\\n").

Checkpoint (`save_awaker_bin`): the full PeftModel state dict, keys `base_model.model.` + the
transformers 4.45 names (`visual.*`, `model.embed_tokens.weight`, `model.layers.{L}.*`,
`model.norm.weight`, `lm_head.weight`); an adapted linear keeps its base weight under its plain
name (`q_proj.weight`, `q_proj.bias`), then `q_proj.lora_A.default.weight` (r, in),
`q_proj.lora_B.default.weight` (out, r), `o_proj.lora_moe_A.{0..3,g}.weight` (r, in),
`o_proj.lora_moe_B.{0..3,g}.weight` (out, r), and on o_proj and gate_proj only
`w_gate.weight` (E, in), `w_gate.bias` (E,), `ln.weight` (in,).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# Qwen2-VL's tokenizer ids (they live in the tokenizer, not in config.json).
VISION_START_ID = 151652
IM_START_ID = 151644
IM_END_ID = 151645

LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MOE_TARGETS = ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ROUTER_TARGETS = ("self_attn.o_proj", "mlp.gate_proj")
RMS_EPS = 1e-6
CHECKPOINT_PREFIX = "base_model.model."


def expert_names(num_experts: int) -> list[str]:
    """Adapter names in insertion order: the experts "0".."E-1", then the general expert "g"."""
    return [str(i) for i in range(num_experts)] + ["g"]


class _GateState:
    """What every adapted linear of one model reads: the current per-sequence gate input."""

    def __init__(self) -> None:
        self.pooled: torch.Tensor | None = None


class Route(NamedTuple):
    """One router's decision for a batch: logits (B, E), float16 probs (B, E), float16 gates
    (B, E, one non-zero per row), the chosen expert (B,) and its float16 weight (B,)."""

    logits: torch.Tensor
    probs: torch.Tensor
    gates: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor


class GateInputs(NamedTuple):
    """The per-sequence gate inputs (B, hidden) of one prompt: `prefill` (image features in the
    image positions) and `decode` (plain token embeddings everywhere)."""

    prefill: torch.Tensor
    decode: torch.Tensor


class AwakerRMSNorm(nn.Module):
    """The router's RMSNorm: normalised in float32, cast back to the input dtype, then scaled."""

    def __init__(self, dim: int, eps: float = RMS_EPS, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.float()
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + self.eps)
        return q.type_as(x) * self.weight


class AwakerLoraLinear(nn.Module):
    """q/k/v_proj: base linear plus one LoRA adapter "default" (float32 A and B)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        device = base.weight.device
        self.lora_A = nn.ModuleDict(
            {"default": nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)}
        )
        self.lora_B = nn.ModuleDict(
            {"default": nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)}
        )
        self.scaling = {"default": alpha / rank}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        previous_dtype = x.dtype
        result = F.linear(x, self.weight, self.bias)
        lora_a, lora_b = self.lora_A["default"], self.lora_B["default"]
        x = x.to(lora_a.weight.dtype)
        result += lora_b(lora_a(x)) * self.scaling["default"]
        return result.to(previous_dtype)


class AwakerMoeLinear(nn.Module):
    """o_proj / gate_proj / up_proj / down_proj: base linear plus experts "0".."E-1" and "g".

    With `router=True` (o_proj, gate_proj) the module owns `w_gate` and `ln`; otherwise
    `gate_source` names the module whose router it follows (gate_proj, for up/down_proj)."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        num_experts: int,
        state: _GateState,
        router: bool,
        gate_source: AwakerMoeLinear | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.num_experts = num_experts
        self.topk = 1
        self.gates_tmp = 1.0
        dtype, device = base.weight.dtype, base.weight.device
        names = expert_names(num_experts)
        self.lora_moe_A = nn.ModuleDict(
            {n: nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype) for n in names}
        )
        self.lora_moe_B = nn.ModuleDict(
            {n: nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype) for n in names}
        )
        self.scaling = {n: alpha / rank for n in names}
        if router:
            self.w_gate = nn.Linear(self.in_features, num_experts, bias=True, device=device, dtype=dtype)
            self.ln = AwakerRMSNorm(self.in_features, dtype=dtype).to(device)
        elif gate_source is None:
            raise ValueError("a MoE linear without a router needs the module whose gates it uses")
        # Plain attributes, not submodules: kept out of the state dict.
        self.__dict__["_state"] = state
        self.__dict__["_gate_source"] = gate_source

    @property
    def has_router(self) -> bool:
        return hasattr(self, "w_gate")

    def route(self, pooled: torch.Tensor) -> Route:
        """The router on a per-sequence gate input `pooled` (B, in)."""
        if not self.has_router:
            return self._gate_source.route(pooled)
        logits = self.w_gate(self.ln(pooled))
        probs = F.softmax(logits / self.gates_tmp, dim=1, dtype=torch.float16)
        top_values, top_indices = probs.topk(min(self.topk + 1, self.num_experts), dim=1)
        chosen_values, chosen_indices = top_values[:, : self.topk], top_indices[:, : self.topk]
        gates = torch.zeros_like(probs).scatter(1, chosen_indices, chosen_values)
        return Route(logits, probs, gates, chosen_indices[:, 0], chosen_values[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self._state.pooled
        if pooled is None:
            raise RuntimeError("no gate input set: call the model through awaker_logits / awaker_generate")
        if pooled.shape[0] != x.shape[0]:
            raise RuntimeError(f"gate input has {pooled.shape[0]} rows, the batch has {x.shape[0]}")
        previous_dtype = x.dtype
        result = F.linear(x, self.weight, self.bias)
        gates = self.route(pooled).gates  # (B, E) float16
        names = expert_names(self.num_experts)

        # The dispatcher: every (row, expert) pair with a non-zero gate, grouped by expert.
        pairs = torch.nonzero(gates)  # (N, 2): row, expert
        order = torch.argsort(pairs[:, 1], stable=True)
        rows, experts = pairs[order, 0], pairs[order, 1]
        pair_gates = gates[rows, experts].view(-1, 1, 1)  # float16, (N, 1, 1)
        pieces = []
        for e in range(self.num_experts):
            pick = experts == e
            if not bool(pick.any()):
                continue
            name = names[e]
            xe = x[rows[pick]].to(self.lora_moe_A[name].weight.dtype)
            ue = self.lora_moe_B[name](self.lora_moe_A[name](xe)) * self.scaling[name]
            pieces.append(ue * pair_gates[pick])
        stitched = torch.cat(pieces, 0).float()
        y_e = torch.zeros(x.shape[0], *stitched.shape[1:], dtype=torch.float32, device=x.device)
        y_e = y_e.index_add(0, rows, stitched)

        xg = x.to(self.lora_moe_A["g"].weight.dtype)
        y_g = self.lora_moe_B["g"](self.lora_moe_A["g"](xg)) * self.scaling["g"]
        w = gates.max(dim=1).values.view(-1, 1, 1)  # float16
        result += y_e * w + y_g * (1 - w)
        return result.to(previous_dtype)


def _decoder_layers(model) -> nn.ModuleList:
    return model.model.language_model.layers


def add_awaker_adapters(
    model, rank: int, num_experts: int = 4, alpha: float | None = None, seed: int = 0, strength: float = 0.05
):
    """Wrap every decoder layer's q/k/v_proj (LoRA) and o/gate/up/down_proj (MoE-LoRA), in place.

    alpha defaults to 2 * rank (Awaker's ratio), so s = 2. Every adapter weight is random and
    non-zero (peft would start B at zero): A ~ N(0, 1/in), B ~ N(0, (strength / (s sqrt(r)))^2),
    so s B A x is about `strength` times x in size; routers w_gate ~ N(0, 4/in), bias ~ N(0, 0.25),
    ln.weight ~ 1 + N(0, 0.01), which spreads the routing over the experts. Returns the model.
    """
    alpha = 2.0 * rank if alpha is None else float(alpha)
    scaling = alpha / rank
    generator = torch.Generator().manual_seed(seed)
    state = _GateState()
    model.__dict__["_awaker_state"] = state

    def normal(shape, std):
        return torch.randn(shape, generator=generator) * std

    def fill_lora(a: nn.Linear, b: nn.Linear) -> None:
        with torch.no_grad():
            a.weight.copy_(normal(a.weight.shape, a.in_features**-0.5))
            b.weight.copy_(normal(b.weight.shape, strength / (scaling * rank**0.5)))

    for layer in _decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            wrapped = AwakerLoraLinear(getattr(attn, name), rank, alpha)
            fill_lora(wrapped.lora_A["default"], wrapped.lora_B["default"])
            setattr(attn, name, wrapped)
        o_proj = AwakerMoeLinear(attn.o_proj, rank, alpha, num_experts, state, router=True)
        gate_proj = AwakerMoeLinear(mlp.gate_proj, rank, alpha, num_experts, state, router=True)
        up_proj = AwakerMoeLinear(mlp.up_proj, rank, alpha, num_experts, state, False, gate_source=gate_proj)
        down_proj = AwakerMoeLinear(mlp.down_proj, rank, alpha, num_experts, state, False, gate_source=gate_proj)
        for module in (o_proj, gate_proj, up_proj, down_proj):
            for n in expert_names(num_experts):
                fill_lora(module.lora_moe_A[n], module.lora_moe_B[n])
            if module.has_router:
                with torch.no_grad():
                    module.w_gate.weight.copy_(normal(module.w_gate.weight.shape, 2.0 * module.in_features**-0.5))
                    module.w_gate.bias.copy_(normal(module.w_gate.bias.shape, 0.5))
                    module.ln.weight.copy_(1.0 + normal(module.ln.weight.shape, 0.1))
        attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj = o_proj, gate_proj, up_proj, down_proj
    return model.eval()


def cast_like_release(model, dtype: torch.dtype):
    """Cast an adapted model to `dtype` the way the release ends up: everything in `dtype`
    (MoE adapters and routers included) except the q/k/v LoRA A and B, which stay float32."""
    model.to(dtype)
    for module in adapted_modules(model).values():
        if isinstance(module, AwakerLoraLinear):
            module.lora_A.float()
            module.lora_B.float()
    return model


def adapted_modules(model) -> dict[str, nn.Module]:
    """{"layers.{L}.self_attn.q_proj": module, ...} for every wrapped linear."""
    out = {}
    for index, layer in enumerate(_decoder_layers(model)):
        for target in LORA_TARGETS + MOE_TARGETS:
            parent, name = target.split(".")
            out[f"layers.{index}.{target}"] = getattr(getattr(layer, parent), name)
    return out


# ---------------------------------------------------------------------------------------------
# Gate inputs


def prompt_pos(
    input_ids: torch.Tensor,
    vision_start_id: int = VISION_START_ID,
    im_start_id: int = IM_START_ID,
    im_end_id: int = IM_END_ID,
    has_image=None,
) -> torch.Tensor:
    """[start, end) per row (B, 2), indices in the (left-padded) row.

    start = first `<|vision_start|>` if the row has an image, else second `<|im_start|>` + 2;
    end = second `<|im_end|>`. `has_image` (a bool or one per row) defaults to "the row holds a
    `<|vision_start|>`"; pass it to follow the release exactly when a row has a video only (the
    release decides on images alone and then uses the second `<|im_start|>`)."""
    out = []
    for i, row in enumerate(input_ids.tolist()):
        row_has_image = (
            vision_start_id in row
            if has_image is None
            else bool(has_image if isinstance(has_image, bool) else has_image[i])
        )

        def nth(value, n, row=row):
            hits = [j for j, token in enumerate(row) if token == value]
            if len(hits) < n:
                raise ValueError(f"row {i}: fewer than {n} occurrences of token {value}")
            return hits[n - 1]

        start = nth(vision_start_id, 1) if row_has_image else nth(im_start_id, 2) + 2
        end = nth(im_end_id, 2)
        if not start < end:
            raise ValueError(f"row {i}: empty prompt span [{start}, {end})")
        out.append([start, end])
    return torch.tensor(out, dtype=torch.long, device=input_ids.device)


def _pool(embeds: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    return torch.stack([embeds[i, int(s) : int(e)].mean(0) for i, (s, e) in enumerate(span.tolist())], 0)


@torch.no_grad()
def gate_inputs(model, input_ids, prompt_pos, pixel_values=None, image_grid_thw=None) -> GateInputs:
    """Both per-sequence gate inputs of a prompt (see the module docstring)."""
    if prompt_pos is None:
        raise ValueError("prompt_pos is required: compute it with prompt_pos(input_ids, ...)")
    embed = model.get_input_embeddings()
    plain = embed(input_ids).detach()
    with_images = plain.clone()
    if pixel_values is not None:
        features = model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output
        features = torch.cat(features, 0).to(with_images.dtype)
        with_images[input_ids == model.config.image_token_id] = features
    return GateInputs(_pool(with_images, prompt_pos), _pool(plain, prompt_pos))


@contextlib.contextmanager
def fixed_gate(model, pooled: torch.Tensor):
    """Every forward inside routes by `pooled` (B, hidden)."""
    state = model._awaker_state
    saved, state.pooled = state.pooled, pooled
    try:
        yield
    finally:
        state.pooled = saved


@torch.no_grad()
def routing(model, pooled: torch.Tensor) -> dict[tuple[int, str], Route]:
    """{(layer, "o_proj" | "gate_proj"): Route} for a gate input (B, hidden): each row's expert
    (B,) and float16 weight (B,), plus the logits, probs and gates. up/down_proj follow gate_proj."""
    out = {}
    for index, layer in enumerate(_decoder_layers(model)):
        out[(index, "o_proj")] = layer.self_attn.o_proj.route(pooled)
        out[(index, "gate_proj")] = layer.mlp.gate_proj.route(pooled)
    return out


# ---------------------------------------------------------------------------------------------
# Forward and generation


def _mm_token_type_ids(model, input_ids):
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == model.config.image_token_id] = 1
    types[input_ids == model.config.video_token_id] = 2
    return types


def _position_ids(model, input_ids, attention_mask, image_grid_thw, types):
    """(4, B, T) as generate's prefill builds them: text positions, then the three M-RoPE streams."""
    text = attention_mask.long().cumsum(-1) - 1
    text = text.masked_fill(attention_mask == 0, 0)
    if image_grid_thw is not None:
        vision, _ = model.model.get_rope_index(
            input_ids, mm_token_type_ids=types, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
    else:
        vision = text.unsqueeze(0).expand(3, -1, -1)
    return torch.cat([text[None], vision], 0)


@torch.no_grad()
def awaker_logits(model, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, prompt_pos=None):
    """One full forward (no cache) routed by the prefill gate input: logits (B, T, V)."""
    gates = gate_inputs(model, input_ids, prompt_pos, pixel_values, image_grid_thw)
    types = _mm_token_type_ids(model, input_ids)
    position_ids = _position_ids(model, input_ids, attention_mask, image_grid_thw, types)
    with fixed_gate(model, gates.prefill):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=types,
            use_cache=False,
        )
    return out.logits


@torch.no_grad()
def awaker_generate(
    model,
    input_ids,
    attention_mask,
    pixel_values=None,
    image_grid_thw=None,
    prompt_pos=None,
    max_new_tokens: int = 32,
    gate: str = "released",
    phases: list | None = None,
    **generate_kwargs,
):
    """Greedy `model.generate` with the gate switch of the release.

    gate="released": the prompt (prefill) step routes by the gate input with image features, every
    later step by the plain-embedding one; gate="image_features": the prefill input at every step.
    The step is told by a forward pre-hook from the KV cache length (0 = prefill). If `phases` is
    a list, "prefill" / "decode" is appended to it per forward. Extra keyword arguments go to
    generate (e.g. output_scores=True, return_dict_in_generate=True); returns what it returns.
    """
    if gate not in ("released", "image_features"):
        raise ValueError(f"gate must be 'released' or 'image_features', not {gate!r}")
    gates = gate_inputs(model, input_ids, prompt_pos, pixel_values, image_grid_thw)
    later = gates.decode if gate == "released" else gates.prefill
    state = model._awaker_state

    def pick_gate(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        prefill = cache is None or cache.get_seq_length() == 0
        state.pooled = gates.prefill if prefill else later
        if phases is not None:
            phases.append("prefill" if prefill else "decode")

    options = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, use_cache=True)
    if pixel_values is not None:  # generate's vision-encoder step fails on an explicit None
        options.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
    options.update(generate_kwargs)
    saved = state.pooled
    handle = model.register_forward_pre_hook(pick_gate, with_kwargs=True)
    try:
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_token_type_ids=_mm_token_type_ids(model, input_ids),
            **options,
        )
    finally:
        handle.remove()
        state.pooled = saved


# ---------------------------------------------------------------------------------------------
# Checkpoint in the release's layout


def awaker_key(name: str) -> str:
    """A transformers 5 state-dict key -> the release's key."""
    for new, old in (("model.visual.", "visual."), ("model.language_model.", "model."), ("lm_head.", "lm_head.")):
        if name.startswith(new):
            return CHECKPOINT_PREFIX + old + name[len(new) :]
    raise KeyError(f"no Awaker name for {name!r}")


def transformers_key(name: str) -> str:
    """The release's key -> the transformers 5 state-dict key."""
    if not name.startswith(CHECKPOINT_PREFIX):
        raise KeyError(f"not an Awaker key: {name!r}")
    name = name[len(CHECKPOINT_PREFIX) :]
    for old, new in (("visual.", "model.visual."), ("model.", "model.language_model."), ("lm_head.", "lm_head.")):
        if name.startswith(old):
            return new + name[len(old) :]
    raise KeyError(f"not an Awaker key: {name!r}")


def awaker_state_dict(model) -> dict[str, torch.Tensor]:
    return {awaker_key(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def save_awaker_bin(model, path) -> None:
    """The full state dict in the release's key layout, a plain dict of tensors, `torch.save`d."""
    torch.save(awaker_state_dict(model), path)


def load_awaker_bin(model, path_or_state) -> None:
    """Load a release-layout state dict (a path or a dict) into an adapted model, strictly."""
    state = torch.load(path_or_state, weights_only=True) if not isinstance(path_or_state, dict) else path_or_state
    model.load_state_dict({transformers_key(k): v for k, v in state.items()}, strict=True)


def expected_awaker_keys(config, rank: int, num_experts: int = 4) -> dict[str, tuple[int, ...]]:
    """Every key of the release's checkpoint with its shape, derived from a Qwen2VLConfig alone
    (the transformers 4.45 Qwen2-VL layout plus the adapters peft adds)."""
    v, t = config.vision_config, config.text_config
    keys: dict[str, tuple[int, ...]] = {}
    p = CHECKPOINT_PREFIX
    e = v.embed_dim
    keys[p + "visual.patch_embed.proj.weight"] = (e, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    hidden_mlp = int(e * v.mlp_ratio)
    for i in range(v.depth):
        b = f"{p}visual.blocks.{i}."
        for norm in ("norm1", "norm2"):
            keys[b + norm + ".weight"] = keys[b + norm + ".bias"] = (e,)
        keys[b + "attn.qkv.weight"], keys[b + "attn.qkv.bias"] = (3 * e, e), (3 * e,)
        keys[b + "attn.proj.weight"], keys[b + "attn.proj.bias"] = (e, e), (e,)
        keys[b + "mlp.fc1.weight"], keys[b + "mlp.fc1.bias"] = (hidden_mlp, e), (hidden_mlp,)
        keys[b + "mlp.fc2.weight"], keys[b + "mlp.fc2.bias"] = (e, hidden_mlp), (e,)
    merged = e * v.spatial_merge_size**2
    keys[p + "visual.merger.ln_q.weight"] = keys[p + "visual.merger.ln_q.bias"] = (e,)
    keys[p + "visual.merger.mlp.0.weight"], keys[p + "visual.merger.mlp.0.bias"] = (merged, merged), (merged,)
    keys[p + "visual.merger.mlp.2.weight"], keys[p + "visual.merger.mlp.2.bias"] = (
        (v.hidden_size, merged),
        (v.hidden_size,),
    )

    h, inter = t.hidden_size, t.intermediate_size
    head_dim = getattr(t, "head_dim", None) or h // t.num_attention_heads
    q_out, kv_out = t.num_attention_heads * head_dim, t.num_key_value_heads * head_dim
    keys[p + "model.embed_tokens.weight"] = (t.vocab_size, h)
    linears = {
        "self_attn.q_proj": (h, q_out, True),
        "self_attn.k_proj": (h, kv_out, True),
        "self_attn.v_proj": (h, kv_out, True),
        "self_attn.o_proj": (q_out, h, False),
        "mlp.gate_proj": (h, inter, False),
        "mlp.up_proj": (h, inter, False),
        "mlp.down_proj": (inter, h, False),
    }
    for layer in range(t.num_hidden_layers):
        b = f"{p}model.layers.{layer}."
        for target, (fan_in, fan_out, bias) in linears.items():
            keys[b + target + ".weight"] = (fan_out, fan_in)
            if bias:
                keys[b + target + ".bias"] = (fan_out,)
            if target in LORA_TARGETS:
                keys[b + target + ".lora_A.default.weight"] = (rank, fan_in)
                keys[b + target + ".lora_B.default.weight"] = (fan_out, rank)
            else:
                for n in expert_names(num_experts):
                    keys[b + target + f".lora_moe_A.{n}.weight"] = (rank, fan_in)
                    keys[b + target + f".lora_moe_B.{n}.weight"] = (fan_out, rank)
            if target in ROUTER_TARGETS:
                keys[b + target + ".w_gate.weight"] = (num_experts, fan_in)
                keys[b + target + ".w_gate.bias"] = (num_experts,)
                keys[b + target + ".ln.weight"] = (fan_in,)
        keys[b + "input_layernorm.weight"] = keys[b + "post_attention_layernorm.weight"] = (h,)
    keys[p + "model.norm.weight"] = (h,)
    keys[p + "lm_head.weight"] = (t.vocab_size, h)
    return keys


def awaker_key_count(config, num_experts: int = 4) -> int:
    """How many tensors the release's checkpoint holds for this config."""
    return len(expected_awaker_keys(config, rank=1, num_experts=num_experts))


def is_adapter_key(key: str) -> bool:
    return any(part in key for part in (".lora_A.", ".lora_B.", ".lora_moe_A.", ".lora_moe_B.", ".w_gate.", ".ln."))
