"""Qwen2-VL's vision tower against transformers' `Qwen2VisionTransformerPretrainedModel` (tiny random
config, float32), on processor-made rows: three images of different sizes and aspect ratios and
one 4-frame video (two temporal slices)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from skimage import data
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig as HFVisionConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from aria_jax import attention as attention_module
from aria_jax.qwen2_vl.config import Qwen2VLVisionConfig
from aria_jax.qwen2_vl.vision import VISION_RULES, Qwen2VLVisionTower, rows_to_features, vision_rows
from aria_jax.weights import flatten_tree, unflatten_tree

TINY = dict(
    depth=2,
    embed_dim=32,
    num_heads=2,
    hidden_size=64,
    mlp_ratio=4,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    in_channels=3,
)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 64
# float32 differences here are under 1e-6 of the output's scale; 1e-5 would let a LayerNorm eps of
# 1e-5 instead of 1e-6 pass (8e-6), so the bound is tighter.
TOLERANCE = 3e-6


def tiny_reference():
    torch.manual_seed(0)
    config = HFVisionConfig(**TINY)
    config._attn_implementation = "eager"
    model = Qwen2VisionTransformerPretrainedModel(config).eval()
    # Random norms and biases too (the initializer leaves them 1 and 0), so each one is checked.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.05)
    return model


def hub_state(model) -> dict[str, np.ndarray]:
    """The tower's tensors under the hub's `visual.` names."""
    return {"visual." + key: value.detach().numpy() for key, value in model.state_dict().items()}


def convert(state: dict[str, np.ndarray], param_shapes: dict[tuple[str, ...], tuple[int, ...]]) -> dict:
    """Params from hub tensors through VISION_RULES' layouts (stacked rules: one tensor per layer)."""
    flat = {}
    for rule in VISION_RULES:
        shape = param_shapes[rule.path]
        if rule.stacked:
            layers = [rule.layout.to_param(state[rule.template.format(i=i)], shape[1:]) for i in range(shape[0])]
            flat[rule.path] = jnp.asarray(np.stack(layers))
        else:
            flat[rule.path] = jnp.asarray(rule.layout.to_param(state[rule.template], shape))
        assert flat[rule.path].shape == shape, rule
    return unflatten_tree(flat)


def param_shapes(tower: Qwen2VLVisionTower, cfg: Qwen2VLVisionConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    rows, length = 1, 4 * cfg.merge_area
    abstract = jax.eval_shape(
        tower.init,
        jax.random.PRNGKey(0),
        jnp.zeros((rows, length, cfg.patch_features)),
        jnp.ones((rows, length), bool),
        jnp.zeros((rows, length, 2), jnp.int32),
    )
    params = nn.unbox(abstract)["params"]
    return {("visual",) + path: leaf.shape for path, leaf in flatten_tree(params).items()}


def media(cfg: Qwen2VLVisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """pixel_values and grid_thw of three images (landscape, portrait, square) and a 4-frame video."""
    processor = Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        patch_size=cfg.patch_size,
        merge_size=cfg.spatial_merge_size,
        temporal_patch_size=cfg.temporal_patch_size,
    )
    images = [data.astronaut()[:280, :500], data.coffee()[:, 100:300], data.chelsea()[:200, :200]]
    out = processor(images=images, return_tensors="np")
    pixel_values, grid_thw = [out["pixel_values"]], [out["image_grid_thw"]]

    # The video processor needs torchvision (not installed); its patch order (slice, window, patch
    # in window; features channel, frame, y, x) is rebuilt here over four random frames standing
    # in for normalized ones, at the size the image processor picks for a photo.
    frame = processor(images=[data.rocket()[:300, :400]], return_tensors="np")
    _, h, w = frame["image_grid_thw"][0]
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(4, 3, h * cfg.patch_size, w * cfg.patch_size)).astype(np.float32)
    t, m, p, tp = 4 // cfg.temporal_patch_size, cfg.spatial_merge_size, cfg.patch_size, cfg.temporal_patch_size
    video = frames.reshape(t, tp, 3, h // m, m, p, w // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values.append(video.reshape(t * h * w, cfg.patch_features))
    grid_thw.append(np.array([[t, h, w]]))
    return np.concatenate(pixel_values).astype(np.float32), np.concatenate(grid_thw)


@pytest.fixture(scope="module")
def case():
    cfg = Qwen2VLVisionConfig(**TINY)
    model = tiny_reference()
    tower = Qwen2VLVisionTower(cfg)
    state = hub_state(model)
    params = convert(state, param_shapes(tower, cfg))
    pixel_values, grid_thw = media(cfg)
    with torch.no_grad():
        expected = model(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid_thw)).pooler_output.numpy()
    return dict(
        cfg=cfg, state=state, params=params, run=jitted(tower), pixels=pixel_values, grid=grid_thw, ref=expected
    )


def jitted(tower):
    return jax.jit(lambda params, *rows: tower.apply({"params": params["visual"]}, *rows))


def features(case, pad_to=None, fill=None):
    patches, mask, positions, counts = vision_rows(case["pixels"], case["grid"], case["cfg"].spatial_merge_size, pad_to)
    if fill is not None:
        patches, positions = fill(patches, positions, mask)
    merged = case["run"](case["params"], jnp.asarray(patches), jnp.asarray(mask), jnp.asarray(positions))
    return np.asarray(rows_to_features(merged, counts))


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def test_media_cover_sizes_and_a_video(case):
    grid = case["grid"]
    assert len({tuple(g) for g in grid[:, 1:].tolist()}) == 4, grid
    assert grid[-1, 0] == 2 and (grid[:-1, 0] == 1).all()
    assert len({h / w for _, h, w in grid[:3]}) == 3


def test_matches_transformers(case):
    got = features(case)
    assert got.shape == case["ref"].shape
    assert relative_error(got, case["ref"]) < TOLERANCE


def test_blockwise_attention_matches_transformers(case, monkeypatch):
    """Large slices take the blockwise kernel (`attention.DENSE_LIMIT`); forced here, with key
    blocks of 64 so that rows span several blocks and some blocks hold only padding."""
    whole_rows = attention_module.blockwise_attention

    def small_blocks(q, k, v, key_mask, query_offset, block, scales=None, query_block=None):
        return whole_rows(q, k, v, key_mask, query_offset, 64, scales, query_block)

    monkeypatch.setattr(attention_module, "DENSE_LIMIT", 0)
    monkeypatch.setattr(attention_module, "blockwise_attention", small_blocks)
    blockwise = dict(case, run=jitted(Qwen2VLVisionTower(case["cfg"])))
    assert relative_error(features(blockwise), case["ref"]) < TOLERANCE


def test_padding_rows_longer_changes_nothing(case):
    patches, *_ = vision_rows(case["pixels"], case["grid"], case["cfg"].spatial_merge_size)
    longer = features(case, pad_to=patches.shape[1] + 4 * case["cfg"].merge_area)
    assert relative_error(longer, features(case)) < 1e-6


def test_padded_patches_never_leak(case):
    def garbage(patches, positions, mask):
        rng = np.random.default_rng(1)
        patches = np.where(mask[..., None], patches, 1e3 * rng.normal(size=patches.shape)).astype(np.float32)
        positions = np.where(mask[..., None], positions, rng.integers(0, 50, size=positions.shape)).astype(np.int32)
        return patches, positions

    clean = features(case)
    dirty = features(case, fill=garbage)
    assert np.array_equal(clean, dirty) or relative_error(dirty, clean) < 1e-6


def test_rows_follow_the_reference_order(case):
    from transformers.vision_utils import get_vision_position_ids

    cfg = case["cfg"]
    patches, mask, positions, counts = vision_rows(case["pixels"], case["grid"], cfg.spatial_merge_size)
    expected = get_vision_position_ids(torch.from_numpy(case["grid"]), cfg.spatial_merge_size).numpy()
    assert np.array_equal(positions[mask], expected)
    assert np.array_equal(patches[mask], case["pixels"])
    assert counts.sum() * cfg.merge_area == mask.sum() == len(case["pixels"])
    windows = patches.shape[1] // cfg.merge_area
    assert windows & (windows - 1) == 0 and windows >= mask.sum(axis=1).max() // cfg.merge_area


def test_key_table_is_the_reference_state_dict(case):
    cfg, state = case["cfg"], case["state"]
    shapes = param_shapes(Qwen2VLVisionTower(cfg), cfg)
    assert {rule.path for rule in VISION_RULES} == set(shapes)
    keys = {}
    for rule in VISION_RULES:
        shape = shapes[rule.path]
        for i in range(shape[0]) if rule.stacked else [None]:
            key = rule.template.format(i=i) if rule.stacked else rule.template
            keys[key] = rule.layout.hub_shape(shape[1:] if rule.stacked else shape)
    assert set(keys) == set(state)
    assert {key: tuple(value.shape) for key, value in state.items()} == keys
    for rule in VISION_RULES:  # to_hub inverts to_param
        key = rule.template.format(i=0)
        assert np.array_equal(rule.layout.to_hub(layer_of(case["params"], rule)), state[key])


def layer_of(params: dict, rule) -> np.ndarray:
    node = params
    for part in rule.path:
        node = node[part]
    return np.asarray(node[0] if rule.stacked else node)
