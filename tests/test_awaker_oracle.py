"""The Awaker2.5-VL oracle (tests/awaker_oracle.py) checked against its own formula, the plain
transformers model, greedy decoding by full forwards, and the release's checkpoint layout."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import awaker_oracle as ao  # noqa: E402

IMAGE, VIDEO, VISION_START, VISION_END, IM_START, IM_END = 290, 291, 292, 293, 280, 281
PAD = 0
RANK = 8
GRID = [1, 4, 6]  # 24 patches, 6 image tokens after the 2x2 merge
IDS = dict(vision_start_id=VISION_START, im_start_id=IM_START, im_end_id=IM_END)


def tiny_config():
    return transformers.Qwen2VLConfig(
        text_config=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=300,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            tie_word_embeddings=False,
            bos_token_id=PAD,
            eos_token_id=None,
            pad_token_id=PAD,
        ),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            num_heads=2,
            mlp_ratio=2,
            hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return transformers.Qwen2VLForConditionalGeneration(tiny_config()).eval()


@pytest.fixture
def adapted(base_model):
    return ao.add_awaker_adapters(copy.deepcopy(base_model), rank=RANK, seed=0)


def chat(user: list[int]) -> list[int]:
    """system turn, user turn, then the assistant's header (token ids by hand)."""
    return [IM_START, 10, 11, IM_END, 12, IM_START, 13, 12, *user, IM_END, 12, IM_START, 14, 12]


def image_prompt():
    n_tokens = GRID[0] * GRID[1] * GRID[2] // 4
    ids = torch.tensor([chat([VISION_START] + [IMAGE] * n_tokens + [VISION_END, 20, 21, 22])])
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(GRID[0] * GRID[1] * GRID[2], 3 * 2 * 14 * 14, generator=generator)
    return ids, torch.ones_like(ids), pixel_values, torch.tensor([GRID])


def text_prompt():
    ids = torch.tensor([chat([30, 31, 32, 33, 34])])
    return ids, torch.ones_like(ids)


def greedy_by_full_forwards(model, ids, mask, pixel_values, grid, span, steps):
    """Greedy decoding with no cache: one full forward (prefill gate) per new token."""
    for _ in range(steps):
        logits = ao.awaker_logits(model, ids, mask, pixel_values, grid, span)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


def test_prompt_pos_follows_the_release():
    ids, *_ = image_prompt()
    assert ao.prompt_pos(ids, **IDS).tolist() == [[8, 19]]  # <|vision_start|> .. second <|im_end|>
    text, _ = text_prompt()
    assert ao.prompt_pos(text, **IDS).tolist() == [[7, 13]]  # second <|im_start|> + 2 (after "user\n")
    padded = torch.cat([torch.full((1, 3), PAD), text], 1)
    assert ao.prompt_pos(padded, **IDS).tolist() == [[10, 16]]  # indices in the padded row


def test_zero_b_gives_the_plain_model(base_model, adapted):
    ids, mask, pixel_values, grid = image_prompt()
    span = ao.prompt_pos(ids, **IDS)
    with torch.no_grad():
        plain = base_model(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixel_values,
            image_grid_thw=grid,
            mm_token_type_ids=(ids == IMAGE).int(),
        ).logits
    with_adapters = ao.awaker_logits(adapted, ids, mask, pixel_values, grid, span)
    moved = (with_adapters - plain).abs().max().item()
    assert 1e-3 * plain.abs().max().item() < moved < plain.abs().max().item()  # visible, sane
    for module in ao.adapted_modules(adapted).values():
        for b in (getattr(module, "lora_B", None) or module.lora_moe_B).values():
            torch.nn.init.zeros_(b.weight)
    zeroed = ao.awaker_logits(adapted, ids, mask, pixel_values, grid, span)
    torch.testing.assert_close(zeroed, plain, rtol=0, atol=1e-6)


def test_o_proj_by_hand(adapted):
    o_proj = adapted.model.language_model.layers[0].self_attn.o_proj
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 64, generator=generator)
    pooled = torch.randn(3, 64, generator=generator) * 0.05
    with torch.no_grad(), ao.fixed_gate(adapted, pooled):
        got = o_proj(x)

        s = 2.0  # alpha / r with alpha = 2 r
        normed = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6) * o_proj.ln.weight
        logits = normed @ o_proj.w_gate.weight.T + o_proj.w_gate.bias
        probs = torch.softmax(logits.half(), dim=-1)  # float16 softmax
        expert = probs.argmax(-1)
        w16 = probs.gather(1, expert[:, None])[:, 0]  # float16, not renormalised

        def expected(w_expert, w_general):
            rows = []
            for i in range(3):
                a, b = o_proj.lora_moe_A[str(int(expert[i]))].weight, o_proj.lora_moe_B[str(int(expert[i]))].weight
                ag, bg = o_proj.lora_moe_A["g"].weight, o_proj.lora_moe_B["g"].weight
                rows.append(
                    x[i] @ o_proj.weight.T
                    + w_expert[i] * s * (x[i] @ a.T @ b.T)
                    + w_general[i] * s * (x[i] @ ag.T @ bg.T)
                )
            return torch.stack(rows)

        one_minus_w16 = (1 - w16).float()  # computed in float16
        want = expected(w16.float() ** 2, one_minus_w16)
    assert len(set(expert.tolist())) > 1  # the rows really take different experts
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    # The test can tell the quirks apart: no square, or w in float32, miss by far more.
    w32 = torch.softmax(logits, -1).gather(1, expert[:, None])[:, 0]
    for wrong in (expected(w16.float(), one_minus_w16), expected(w32**2, 1 - w32)):
        assert (wrong - got).abs().max() > 1e-5
    # up_proj and down_proj route with gate_proj's router.
    mlp = adapted.model.language_model.layers[1].mlp
    assert torch.equal(mlp.up_proj.route(pooled).gates, mlp.gate_proj.route(pooled).gates)
    assert not hasattr(mlp.up_proj, "w_gate") and not hasattr(mlp.down_proj, "ln")


def test_bfloat16_keeps_the_release_dtypes(adapted):
    ids, mask = text_prompt()
    span = ao.prompt_pos(ids, **IDS)
    want = ao.awaker_logits(adapted, ids, mask, prompt_pos=span)
    ao.cast_like_release(adapted, torch.bfloat16)
    layer = adapted.model.language_model.layers[0]
    assert layer.self_attn.q_proj.weight.dtype == torch.bfloat16
    assert layer.self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    assert layer.mlp.gate_proj.w_gate.weight.dtype == layer.mlp.up_proj.lora_moe_B["g"].weight.dtype == torch.bfloat16
    assert layer.mlp.gate_proj.route(torch.zeros(1, 64, dtype=torch.bfloat16) + 0.1).weight.dtype == torch.float16
    got = ao.awaker_logits(adapted, ids, mask, prompt_pos=span)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=0.05 * want.abs().max().item())


def test_text_prompt_same_tokens_in_both_gate_modes(adapted):
    ids, mask = text_prompt()
    span = ao.prompt_pos(ids, **IDS)
    phases = []
    released = ao.awaker_generate(adapted, ids, mask, prompt_pos=span, max_new_tokens=4, phases=phases)
    features = ao.awaker_generate(adapted, ids, mask, prompt_pos=span, max_new_tokens=4, gate="image_features")
    assert phases == ["prefill"] + ["decode"] * 3
    assert torch.equal(released, features)
    assert torch.equal(released, greedy_by_full_forwards(adapted, ids, mask, None, None, span, 4))


def route_apart(model, first: torch.Tensor, second: torch.Tensor) -> None:
    """Set every router so that gate input `first` picks expert 0 and `second` expert 1."""
    with torch.no_grad():
        for module in ao.adapted_modules(model).values():
            if not getattr(module, "has_router", False):
                continue
            u, v = module.ln(first)[0], module.ln(second)[0]
            d = u - v
            c = 4.0 / d.dot(d)
            middle = ((u + v) / 2).dot(d)
            module.w_gate.weight.zero_()
            module.w_gate.weight[0], module.w_gate.weight[1] = c * d, -c * d
            module.w_gate.bias.fill_(-10.0)
            module.w_gate.bias[0], module.w_gate.bias[1] = -c * middle, c * middle


def test_image_prompt_gate_modes_route_differently(adapted):
    ids, mask, pixel_values, grid = image_prompt()
    span = ao.prompt_pos(ids, **IDS)
    gates = ao.gate_inputs(adapted, ids, span, pixel_values, grid)
    route_apart(adapted, gates.prefill, gates.decode)
    prefill, decode = ao.routing(adapted, gates.prefill), ao.routing(adapted, gates.decode)
    assert len(prefill) == 4
    assert all(r.expert.tolist() == [0] for r in prefill.values())
    assert all(r.expert.tolist() == [1] for r in decode.values())

    run = dict(max_new_tokens=4, output_logits=True, return_dict_in_generate=True)
    released = ao.awaker_generate(adapted, ids, mask, pixel_values, grid, span, **run)
    features = ao.awaker_generate(adapted, ids, mask, pixel_values, grid, span, gate="image_features", **run)
    torch.testing.assert_close(released.logits[0], features.logits[0], rtol=0, atol=0)  # same prefill
    assert (released.logits[1] - features.logits[1]).abs().max() > 1e-3  # the later steps differ

    # image_features = the prefill gate everywhere = greedy by full forwards.
    full = greedy_by_full_forwards(adapted, ids, mask, pixel_values, grid, span, 4)
    assert torch.equal(features.sequences, full)

    # released: the prompt's cache keeps the prefill routing, the next token routes by `decode`.
    types = (ids == IMAGE).int()
    positions = ao._position_ids(adapted, ids, mask, grid, types)
    with torch.no_grad():
        with ao.fixed_gate(adapted, gates.prefill):
            first = adapted(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                pixel_values=pixel_values,
                image_grid_thw=grid,
                mm_token_type_ids=types,
                use_cache=True,
            )
        token = first.logits[:, -1].argmax(-1, keepdim=True)
        text_next = mask.sum(-1, keepdim=True)
        vision_next = positions[1:, :, -1:].amax(0) + 1
        step_positions = torch.stack([text_next, vision_next, vision_next, vision_next])
        with ao.fixed_gate(adapted, gates.decode):
            second = adapted(
                input_ids=token,
                attention_mask=torch.cat([mask, torch.ones_like(token)], 1),
                position_ids=step_positions,
                past_key_values=first.past_key_values,
                use_cache=True,
            )
    torch.testing.assert_close(released.logits[1], second.logits[:, -1], rtol=0, atol=1e-5)


def test_left_padded_batch_matches_single_rows(adapted):
    image_ids, _, pixel_values, grid = image_prompt()
    text_ids, _ = text_prompt()
    pad = image_ids.shape[1] - text_ids.shape[1]
    ids = torch.cat([image_ids, torch.cat([torch.full((1, pad), PAD), text_ids], 1)])
    mask = (torch.arange(ids.shape[1])[None] >= torch.tensor([[0], [pad]])).long()
    span = ao.prompt_pos(ids, **IDS)
    assert span.tolist() == [ao.prompt_pos(image_ids, **IDS)[0].tolist(), [7 + pad, 13 + pad]]

    batch_logits = ao.awaker_logits(adapted, ids, mask, pixel_values, grid, span)
    batch_tokens = ao.awaker_generate(adapted, ids, mask, pixel_values, grid, span, max_new_tokens=3)
    singles = [(image_ids, pixel_values, grid), (text_ids, None, None)]
    for row, (single, pv, g) in enumerate(singles):
        one_mask = torch.ones_like(single)
        one_span = ao.prompt_pos(single, **IDS)
        logits = ao.awaker_logits(adapted, single, one_mask, pv, g, one_span)
        torch.testing.assert_close(batch_logits[row, -single.shape[1] :], logits[0], rtol=0, atol=1e-5)
        tokens = ao.awaker_generate(adapted, single, one_mask, pv, g, one_span, max_new_tokens=3)
        assert torch.equal(batch_tokens[row, -tokens.shape[1] :], tokens[0])


def test_save_awaker_bin_writes_the_release_layout(adapted, base_model, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    ao.save_awaker_bin(adapted, path)
    saved = torch.load(path, weights_only=True)
    assert type(saved) is dict
    expected = ao.expected_awaker_keys(adapted.config, rank=RANK)
    assert sorted(saved) == sorted(expected)
    assert {k: tuple(v.shape) for k, v in saved.items()} == expected
    assert len(saved) == ao.awaker_key_count(adapted.config)
    layer = "base_model.model.model.layers.1."
    o_proj = adapted.model.language_model.layers[1].self_attn.o_proj
    assert torch.equal(saved[layer + "self_attn.o_proj.lora_moe_B.g.weight"], o_proj.lora_moe_B["g"].weight)
    assert torch.equal(
        saved[layer + "self_attn.q_proj.weight"], base_model.model.language_model.layers[1].self_attn.q_proj.weight
    )
    assert torch.equal(saved["base_model.model.visual.merger.mlp.2.bias"], adapted.model.visual.merger.mlp[2].bias)

    # Round trip into a model with other adapter weights: same logits again.
    other = ao.add_awaker_adapters(copy.deepcopy(base_model), rank=RANK, seed=5)
    ids, mask = text_prompt()
    span = ao.prompt_pos(ids, **IDS)
    assert not torch.equal(
        ao.awaker_logits(other, ids, mask, prompt_pos=span), ao.awaker_logits(adapted, ids, mask, prompt_pos=span)
    )
    ao.load_awaker_bin(other, path)
    assert torch.equal(
        ao.awaker_logits(other, ids, mask, prompt_pos=span), ao.awaker_logits(adapted, ids, mask, prompt_pos=span)
    )


def test_release_sized_adapter_count():
    """Qwen2-VL-7B's shapes with r = 256: 99.65M adapter parameters per layer, 28 layers."""
    config = transformers.Qwen2VLConfig(
        text_config=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
        ),
        vision_config=dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=3584),
    )
    keys = ao.expected_awaker_keys(config, rank=256)
    sizes = {k: int(torch.Size(shape).numel()) for k, shape in keys.items()}
    adapter = sum(n for k, n in sizes.items() if ao.is_adapter_key(k))
    assert adapter == 28 * 99_650_568
    assert sum(sizes.values()) - adapter == 8_291_375_616  # Qwen2-VL-7B-Instruct's own count
    assert len(keys) == ao.awaker_key_count(config) == 391 + 28 * 64 + 3
