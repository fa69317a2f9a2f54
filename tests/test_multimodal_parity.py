"""Float32 parity of the whole multimodal model (vision tower, projector, image-token merge, MoE
decoder, greedy generation) with transformers' PyTorch Aria on the same weights, and loading the
same weights under every key generation.

Each tiny config is built once (random weights, norms included; tests/tiny_models.py), saved with
`save_pretrained`, and loaded from that directory by both sides:
- the oracle: transformers `AriaForConditionalGeneration.from_pretrained(dir)` in float32 with
  `experts_implementation="eager"` (see test_text_parity.py for why);
- ours: `aria_jax.AriaForConditionalGeneration.from_pretrained(dir, dtype="float32")`.

Pixels come from noise images of varied sizes through Aria's preprocessing
(keep-ratio resize, pad, normalize): transformers' `AriaImageProcessorPil` itself where it can run (it
only accepts max_image_size 490 or 980, so the "s980_p70" config uses 70-pixel patches to have
real 980/490 crops on a 14x14 patch grid), and for the 140- and 112-pixel configs `emulated_crop`,
the same algorithm, which `test_emulated_processor_is_the_processor` shows bit-identical to
`AriaImageProcessorPil` at the sizes it accepts.

Every case is compared three ways with one tolerance, TOLERANCE, relative to the reference's
scale: vision features (the last encoder layer *before* post_layernorm, at valid patches;
padded patches are never read), projector output, and logits at attended positions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from PIL import Image

import aria_jax
from aria_jax.safetensors_io import SafetensorsFile
from tiny_models import make_multimodal_model, make_text_model

# max |ours - reference| <= TOLERANCE * max(1, max |reference|), as in test_text_parity.py.
TOLERANCE = 1e-4

PAD_ID = 2  # pad_token_id and eos_token_id of the tiny configs
FIRST_TEXT_ID = 3  # prompt text uses ids >= 3, never the image token
IMAGE_TOKEN_ID = 9
GENERATE_TOKENS = 12


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    vision: dict
    projector: dict[int, int]  # patches per crop -> projector queries
    text: dict
    use_processor: bool = False  # pixels from AriaImageProcessorPil (else emulated_crop)
    min_sizes: tuple[int, int] = (0, 0)  # min_image_size for full- and half-size crops

    @property
    def image_size(self) -> int:
        return self.vision["image_size"]


CONFIGS = {
    # 10x10 patches (half-size crops 5x5), 2 vision layers, MHA text, top-1 routing.
    "s140_p14_mha_top1": TinyConfig(
        vision=dict(
            hidden_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            intermediate_size=48,
            image_size=140,
            patch_size=14,
        ),
        projector={25: 4, 100: 6},
        text=dict(
            vocab_size=128,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=16,
            moe_num_experts=4,
            moe_topk=1,
            moe_num_shared_experts=2,
            num_hidden_layers=2,
        ),
        min_sizes=(48, 24),
    ),
    # 8x8 patches (half-size 4x4), 4 vision heads of 12, GQA 6/2 text, top-2 of 6 experts.
    "s112_p14_gqa_top2": TinyConfig(
        vision=dict(
            hidden_size=48,
            num_attention_heads=4,
            num_hidden_layers=1,
            intermediate_size=40,
            image_size=112,
            patch_size=14,
        ),
        projector={16: 3, 64: 5},
        text=dict(
            vocab_size=128,
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=2,
            intermediate_size=16,
            moe_num_experts=6,
            moe_topk=2,
            moe_num_shared_experts=2,
            num_hidden_layers=3,
            rms_norm_eps=1e-5,
        ),
        min_sizes=(38, 20),
    ),
    # Real 980/490 crops from AriaImageProcessorPil: 70-pixel patches, 14x14 (7x7) patches;
    # 3 vision heads of 8, 3 vision layers, GQA 4/2 text, top-3 of 5 experts, 1 shared expert.
    "s980_p70_gqa_top3_processor": TinyConfig(
        vision=dict(
            hidden_size=24,
            num_attention_heads=3,
            num_hidden_layers=3,
            intermediate_size=36,
            image_size=980,
            patch_size=70,
        ),
        projector={49: 4, 196: 7},
        text=dict(
            vocab_size=128,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=12,
            moe_num_experts=5,
            moe_topk=3,
            moe_num_shared_experts=1,
            num_hidden_layers=2,
        ),
        use_processor=True,
        min_sizes=(336, 336),
    ),
}


# ----------------------------------------------------------------------------- pixels


def noise_image(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def emulated_crop(image: Image.Image, max_size: int, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Aria's non-split crop preprocessing at any size: keep-ratio resize (PIL bicubic) so the
    long side is max_size and the short side at least min_size, pad right/bottom with 0, mask the
    resized area, normalize to [-1, 1]. -> pixel_values (3, S, S) float32, pixel_mask (S, S) bool."""
    width, height = image.size
    scale = max_size / max(width, height)
    if width >= height:
        new_w, new_h = max_size, max(int(height * scale), min_size)
    else:
        new_w, new_h = max(int(width * scale), min_size), max_size
    resized = np.asarray(image.convert("RGB").resize((new_w, new_h), Image.BICUBIC), np.float32)
    pixels = np.zeros((3, max_size, max_size), np.float32)
    pixels[:, :new_h, :new_w] = resized.transpose(2, 0, 1)
    mask = np.zeros((max_size, max_size), bool)
    mask[:new_h, :new_w] = True
    return (pixels / 255.0 - 0.5) / 0.5, mask


def preprocess(cfg: TinyConfig, image: Image.Image, size: int, split: bool = False):
    """One image -> (pixel_values (k, 3, S, S), pixel_mask (k, S, S)) with S = size.

    Split images: AriaImageProcessorPil(split_image=True) where it runs; otherwise the image
    stretched to 2S x S and cut into two tiles, after a global view (the original rhymes-ai layout)."""
    min_size = cfg.min_sizes[0] if size == cfg.image_size else cfg.min_sizes[1]
    if cfg.use_processor:
        out = transformers.AriaImageProcessorPil()(
            images=[image], max_image_size=size, min_image_size=min_size, split_image=split, return_tensors="np"
        )
        return np.asarray(out["pixel_values"], np.float32), np.asarray(out["pixel_mask"], bool)
    crops = [emulated_crop(image, size, min_size)]
    if split:
        stretched = image.convert("RGB").resize((2 * size, size), Image.BICUBIC)
        for left in (0, size):
            crops.append(emulated_crop(stretched.crop((left, 0, left + size, size)), size, min_size))
    return np.stack([c[0] for c in crops]), np.stack([c[1] for c in crops])


@dataclasses.dataclass
class Case:
    input_ids: np.ndarray  # (B, T) int64, left-padded with PAD_ID
    attention_mask: np.ndarray  # (B, T) int64
    pixel_values: np.ndarray  # (N, 3, S, S) float32, crops in token order
    pixel_mask: np.ndarray | None
    crop_labels: list[str]

    @property
    def position_ids(self) -> np.ndarray:
        return np.maximum(np.cumsum(self.attention_mask, axis=-1) - 1, 0)


def build_rows(rng, rows, queries: dict[int, int], vocab_size: int):
    """rows: per batch row, a list of segments: int n = n text tokens, or (label, pv, pm) an image
    (its crops' image tokens, `queries` keyed by crop side in pixels). -> left-padded ids and
    mask, all crops stacked in token order, their labels."""
    token_rows, pixel_values, pixel_masks, labels = [], [], [], []
    for segments in rows:
        tokens = []
        for segment in segments:
            if isinstance(segment, int):
                text = rng.integers(FIRST_TEXT_ID, vocab_size, size=segment)
                tokens.extend(np.where(text == IMAGE_TOKEN_ID, IMAGE_TOKEN_ID + 1, text))
                continue
            label, pv, pm = segment
            tokens.extend([IMAGE_TOKEN_ID] * (len(pv) * queries[pv.shape[-1]]))
            pixel_values.append(pv)
            pixel_masks.append(pm)
            labels.extend(f"{label}[{i}]" if len(pv) > 1 else label for i in range(len(pv)))
        token_rows.append(tokens)
    width = max(len(t) for t in token_rows)
    ids = np.full((len(rows), width), PAD_ID, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for row, tokens in enumerate(token_rows):
        ids[row, width - len(tokens) :] = tokens
        mask[row, width - len(tokens) :] = 1
    return ids, mask, np.concatenate(pixel_values), np.concatenate(pixel_masks), labels


def build_cases(cfg: TinyConfig) -> dict[str, Case]:
    full, half = cfg.image_size, cfg.image_size // 2
    patch = cfg.vision["patch_size"]
    # Image tokens per crop, keyed by the crop's side in pixels.
    queries = {int(round(p**0.5)) * patch: q for p, q in cfg.projector.items()}
    vocab = cfg.text["vocab_size"]
    rng = np.random.default_rng(0)

    def image(label, seed, w, h, size, split=False):
        return (label, *preprocess(cfg, noise_image(seed, round(w), round(h)), size, split))

    # Full-size crops. Row 0: two images in one prompt, a landscape one (valid on a top band)
    # and a portrait one (valid on a left band); row 1 (shorter, so left-padded): one split image.
    landscape = image("landscape", 1, 2.3 * full, 0.8 * full, full)
    portrait = image("portrait", 2, 0.6 * full, 1.3 * full, full)
    split = image("split", 3, 1.53 * full, 1.02 * full, full, split=True)
    ids, mask, pv, pm, labels = build_rows(rng, [[4, landscape, 3, portrait, 5], [2, split, 6]], queries, vocab)
    cases = {"full_size_two_images_and_split": Case(ids, mask, pv, pm, labels)}

    # Half-size ("490") crops: fewer patches, fewer queries, positions on every other row/col.
    # Row 0: a fully valid square crop and a padded portrait crop; row 1: text only, longer.
    square = image("half_square", 4, 0.9 * half, 0.9 * half, half)
    half_portrait = image("half_portrait", 5, 0.6 * half, 1.3 * half, half)
    row0 = [3, square, 2, half_portrait, 4]
    row0_length = sum(s if isinstance(s, int) else len(s[1]) * queries[half] for s in row0)
    ids, mask, pv, pm, labels = build_rows(rng, [row0, [row0_length + 7]], queries, vocab)
    cases["half_size_and_text_only_row"] = Case(ids, mask, pv, pm, labels)

    # pixel_mask=None: every patch is valid, even the padding of these crops.
    ids, mask, pv, _, labels = build_rows(rng, [[3, landscape, 2, portrait, 3]], queries, vocab)
    cases["no_pixel_mask"] = Case(ids, mask, pv, None, labels)
    return cases


# ----------------------------------------------------------------------------- fixtures


@dataclasses.dataclass
class Pair:
    name: str
    cfg: TinyConfig
    directory: str
    reference: torch.nn.Module  # transformers, float32
    ours: aria_jax.AriaForConditionalGeneration  # aria-jax, float32
    cases: dict[str, Case]


def load_reference(directory):
    return transformers.AriaForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32, experts_implementation="eager"
    ).eval()


# Built once per config. A test that picks one config (indirect parametrization) makes pytest set
# the module fixture up again; reusing the Pair keeps ours' compiled functions.
_PAIRS: dict[str, Pair] = {}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory) -> Pair:
    name = request.param
    if name not in _PAIRS:
        cfg = CONFIGS[name]
        directory = tmp_path_factory.mktemp(name)
        make_multimodal_model(
            directory,
            seed=20 + list(CONFIGS).index(name),
            vision_overrides=cfg.vision,
            projector_patch_to_query=cfg.projector,
            **cfg.text,
        )
        reference = load_reference(directory)
        ours = aria_jax.AriaForConditionalGeneration.from_pretrained(directory, dtype="float32")
        _PAIRS[name] = Pair(name, cfg, str(directory), reference, ours, build_cases(cfg))
    return _PAIRS[name]


# Every config runs these two cases; "no_pixel_mask" runs on one config (test_no_pixel_mask).
CASES = ["full_size_two_images_and_split", "half_size_and_text_only_row"]
NO_MASK_CONFIG = "s980_p70_gqa_top3_processor"


# ----------------------------------------------------------------------------- helpers


def torch_or_none(array):
    return None if array is None else torch.from_numpy(array)


def patch_mask(case: Case, patch_size: int) -> np.ndarray:
    """(N, P) bool: a patch is valid if any of its pixels is (all valid without a pixel mask)."""
    n, _, side, _ = case.pixel_values.shape
    if case.pixel_mask is None:
        return np.ones((n, (side // patch_size) ** 2), bool)
    grid = case.pixel_mask.reshape(n, side // patch_size, patch_size, side // patch_size, patch_size)
    return grid.any(axis=(2, 4)).reshape(n, -1)


def reference_vision_features(model, case: Case) -> np.ndarray:
    """The vision tower's last encoder layer output, before post_layernorm (reference 5.5)."""
    with torch.no_grad():
        pixel_mask = torch_or_none(case.pixel_mask)
        patch_attention_mask = None if pixel_mask is None else model.model._create_patch_attention_mask(pixel_mask)
        out = model.model.vision_tower(
            torch.from_numpy(case.pixel_values), patch_attention_mask=patch_attention_mask, output_hidden_states=True
        )
    return out.hidden_states[-1].numpy()


def reference_image_features(model, case: Case) -> np.ndarray:
    with torch.no_grad():
        return model.model.get_image_features(
            pixel_values=torch.from_numpy(case.pixel_values), pixel_mask=torch_or_none(case.pixel_mask)
        ).pooler_output.numpy()


def reference_logits(model, case: Case, pixel_values=None) -> np.ndarray:
    """transformers does not derive positions from the mask in a forward call: pass them."""
    pixel_values = case.pixel_values if pixel_values is None else pixel_values
    with torch.no_grad():
        return model(
            input_ids=torch.from_numpy(case.input_ids),
            attention_mask=torch.from_numpy(case.attention_mask),
            position_ids=torch.from_numpy(case.position_ids),
            pixel_values=torch.from_numpy(pixel_values),
            pixel_mask=torch_or_none(case.pixel_mask),
        ).logits.numpy()


def assert_close(ours, reference, keep, what: str) -> float:
    """Asserts the tolerance over the `keep` positions (leading axes); returns the max abs diff."""
    ours = np.asarray(ours, np.float32)
    assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
    assert keep.any(), f"{what}: nothing to compare"
    assert np.isfinite(ours[keep]).all(), f"{what}: non-finite values"
    diff = float(np.abs(ours[keep] - reference[keep]).max())
    scale = max(1.0, float(np.abs(reference[keep]).max()))
    print(
        f"[{what}] max|diff| = {diff:.3e}  max|ref| = {scale:.3f}  ratio = {diff / scale:.2e} "
        f"(tolerance {TOLERANCE:.0e})"
    )
    assert diff <= TOLERANCE * scale, f"{what}: max |diff| {diff:.3e} > {TOLERANCE} * {scale:.3f}"
    return diff


def per_crop_report(ours, reference, keep, labels) -> str:
    ours = np.asarray(ours, np.float32)
    return ", ".join(
        f"{label}: {np.abs(ours[i][keep[i]] - reference[i][keep[i]]).max():.2e}" for i, label in enumerate(labels)
    )


def error_message(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, f"multi-line error message: {message!r}"
    return message


# ----------------------------------------------------------------------------- forward parity


def test_emulated_processor_is_the_processor():
    """`emulated_crop` (used for the 140- and 112-pixel configs, which AriaImageProcessorPil
    refuses) is AriaImageProcessorPil's own algorithm: bit-identical where the processor runs."""
    processor = transformers.AriaImageProcessorPil()
    for seed, (w, h, size) in enumerate([(700, 300, 490), (200, 640, 490), (100, 90, 490), (1200, 1300, 980)]):
        image = noise_image(seed, w, h)
        out = processor(images=[image], max_image_size=size, min_image_size=336, return_tensors="np")
        pixels, mask = emulated_crop(image, size, 336)
        np.testing.assert_array_equal(out["pixel_values"][0], pixels, err_msg=f"{w}x{h} at {size}")
        np.testing.assert_array_equal(out["pixel_mask"][0], mask, err_msg=f"{w}x{h} at {size}")


def test_cases_cover_the_geometry(pair):
    """The inputs have what the tests below claim: partly padded crops valid on a top band and
    on a left band (with a partial last patch row/col), fully valid crops, several crops of one
    image, half-size crops, and a row without images."""
    cfg, cases = pair.cfg, pair.cases
    p = cfg.vision["patch_size"]
    full = cases["full_size_two_images_and_split"]
    masks = dict(zip(full.crop_labels, full.pixel_mask))
    rows, cols = masks["landscape"].any(1).sum(), masks["landscape"].any(0).sum()
    assert cols == cfg.image_size and rows < cfg.image_size - p and rows % p, (rows, cols)
    assert masks["landscape"][:rows].all()
    rows, cols = masks["portrait"].any(1).sum(), masks["portrait"].any(0).sum()
    assert rows == cfg.image_size and cols < cfg.image_size - p and cols % p, (rows, cols)
    assert masks["portrait"][:, :cols].all()
    split_crops = [label for label in full.crop_labels if label.startswith("split")]
    assert len(split_crops) >= 2, full.crop_labels
    assert full.attention_mask.all(axis=0).sum() < full.attention_mask.shape[1], "no left padding"
    half = cases["half_size_and_text_only_row"]
    assert half.pixel_values.shape[-1] * 2 == cfg.image_size
    assert half.pixel_mask[0].all() and not half.pixel_mask[1].all()
    assert (half.input_ids[0] == IMAGE_TOKEN_ID).any() and not (half.input_ids[1] == IMAGE_TOKEN_ID).any()
    assert half.attention_mask[0, 0] == 0, "the image row should be left-padded"


def check_vision_features(pair, case_name):
    case = pair.cases[case_name]
    keep = patch_mask(case, pair.cfg.vision["patch_size"])
    reference = reference_vision_features(pair.reference, case)
    ours = pair.ours.vision_features(case.pixel_values, case.pixel_mask)
    print(f"[{pair.name} {case_name} vision] per crop: {per_crop_report(ours, reference, keep, case.crop_labels)}")
    assert_close(ours, reference, keep, what=f"{pair.name} {case_name} vision")


def check_projector_output(pair, case_name):
    case = pair.cases[case_name]
    reference = reference_image_features(pair.reference, case)
    side = case.pixel_values.shape[-1]
    assert reference.shape[1] == pair.cfg.projector[(side // pair.cfg.vision["patch_size"]) ** 2]
    ours = pair.ours.image_features(case.pixel_values, case.pixel_mask)
    keep = np.ones(reference.shape[:2], bool)
    print(f"[{pair.name} {case_name} projector] per crop: {per_crop_report(ours, reference, keep, case.crop_labels)}")
    assert_close(ours, reference, keep, what=f"{pair.name} {case_name} projector")
    return np.asarray(ours)


def check_logits(pair, case_name):
    """Logits at attended positions; ours derives positions from the mask (no position_ids)."""
    case = pair.cases[case_name]
    reference = reference_logits(pair.reference, case)
    ours = pair.ours(
        case.input_ids, attention_mask=case.attention_mask, pixel_values=case.pixel_values, pixel_mask=case.pixel_mask
    ).logits
    keep = case.attention_mask.astype(bool)
    assert_close(ours, reference, keep, what=f"{pair.name} {case_name} logits")
    # Not blind: the images move the reference's logits far more than the tolerance.
    blank = reference_logits(pair.reference, case, pixel_values=np.zeros_like(case.pixel_values))
    changed = np.abs(blank - reference)[keep].max()
    assert changed > 100 * TOLERANCE * max(1.0, np.abs(reference[keep]).max()), changed


@pytest.mark.parametrize("case_name", CASES)
def test_vision_features(pair, case_name):
    check_vision_features(pair, case_name)


@pytest.mark.parametrize("case_name", CASES)
def test_projector_output(pair, case_name):
    check_projector_output(pair, case_name)


@pytest.mark.parametrize("case_name", CASES)
def test_logits(pair, case_name):
    check_logits(pair, case_name)


@pytest.mark.parametrize("pair", [NO_MASK_CONFIG], indirect=True)
def test_no_pixel_mask(pair):
    """pixel_mask=None on both sides: every patch valid, even the padding of these crops (the
    landscape and portrait crops of the full-size case). One config is enough: the mask plumbing
    does not depend on the sizes."""
    check_vision_features(pair, "no_pixel_mask")
    ours = check_projector_output(pair, "no_pixel_mask")
    check_logits(pair, "no_pixel_mask")
    # Not blind: None is not "mask the padding", which gives other features.
    masked = dataclasses.replace(
        pair.cases["no_pixel_mask"], pixel_mask=pair.cases["full_size_two_images_and_split"].pixel_mask[:2]
    )
    assert not masked.pixel_mask.all()
    assert np.abs(ours - reference_image_features(pair.reference, masked)).max() > 100 * TOLERANCE


# ----------------------------------------------------------------------------- generation


def reference_generate(model, case: Case) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(case.input_ids),
            attention_mask=torch.from_numpy(case.attention_mask),
            pixel_values=torch.from_numpy(case.pixel_values),
            pixel_mask=torch_or_none(case.pixel_mask),
            do_sample=False,
            max_new_tokens=GENERATE_TOKENS,
            pad_token_id=PAD_ID,
            eos_token_id=PAD_ID,
        ).numpy()
    full = case.input_ids.shape[1] + GENERATE_TOKENS
    if out.shape[1] < full:
        # transformers stops once every row has produced eos; ours returns the full buffer.
        assert (out[:, case.input_ids.shape[1] :] == PAD_ID).any(axis=1).all(), out
        out = np.pad(out, ((0, 0), (0, full - out.shape[1])), constant_values=PAD_ID)
    return out


def test_greedy_generate_with_images(pair):
    """Identical tokens to transformers' greedy generate on a left-padded batch of two prompts
    with images (two images in one, a split image in the other)."""
    case = pair.cases["full_size_two_images_and_split"]
    assert (case.input_ids == IMAGE_TOKEN_ID).any(axis=1).all()
    expected = reference_generate(pair.reference, case)
    ours = pair.ours.generate(
        case.input_ids, case.attention_mask, case.pixel_values, case.pixel_mask, max_new_tokens=GENERATE_TOKENS
    )
    assert ours.shape == expected.shape
    print(f"[{pair.name} generate] {expected[:, case.input_ids.shape[1] :].tolist()}")
    np.testing.assert_array_equal(ours, expected)


# ----------------------------------------------------------------------------- loading


def read_tensors(path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(str(path))
    return {key: np.array(f.get(key)) for key in f.keys()}


def load_json(path):
    with open(path) as f:
        return json.load(f)


def write_checkpoint(directory, tensors: dict[str, np.ndarray], config: dict):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    safetensors.numpy.save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return directory


def rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


# Hub naming -> original rhymes-ai naming: the inverse of transformers' convert_aria_weights_to_hf.py
# KEYS_TO_MODIFY_MAPPING (`original_tensors` also drops the hub's zero post_layernorm and adds the
# rotary inv_freq buffers old files carry).
TO_ORIGINAL = (
    (r"^vision_tower\.", "vision_tower.vision_model."),
    (r"^multi_modal_projector\.layer_norm\.", "multi_modal_projector.ln_ffn."),
    (r"^multi_modal_projector\.feed_forward\.", "multi_modal_projector.ffn."),
    (r"\.cross_attn\.layer_norm_kv\.", ".cross_attn.ln_kv."),
)
# Hub naming -> transformers 5 in-memory naming.
TO_TRANSFORMERS_5 = (
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"\.mlp\.experts\.fc1\.weight$", ".mlp.experts.gate_up_proj"),
    (r"\.mlp\.experts\.fc2\.weight$", ".mlp.experts.down_proj"),
)


def original_tensors(tensors: dict[str, np.ndarray], num_layers: int, head_dim: int) -> dict[str, np.ndarray]:
    out = {rename(k, TO_ORIGINAL): v for k, v in tensors.items() if not k.startswith("vision_tower.post_layernorm.")}
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    for i in range(num_layers):
        out[f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    return out


def original_config(config: dict) -> dict:
    """The remote-code config.json: aria_moe_lm (expert width in moe_intermediate_size, an unused
    intermediate_size, rope_theta at the top) and aria_vision_model."""
    text = {k: v for k, v in config["text_config"].items() if k != "rope_parameters"}
    text.update(
        model_type="aria_moe_lm",
        moe_intermediate_size=text["intermediate_size"],
        intermediate_size=13568,
        rope_theta=config["text_config"]["rope_parameters"]["rope_theta"],
    )
    vision = {**config["vision_config"], "model_type": "aria_vision_model"}
    return {
        **{k: v for k, v in config.items() if k not in ("transformers_version", "dtype")},
        "text_config": text,
        "vision_config": vision,
    }


def flat_params(params) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def assert_params_identical(actual, expected):
    a, e = flat_params(actual), flat_params(expected)
    assert sorted(a) == sorted(e)
    for key in e:
        assert a[key].dtype == e[key].dtype and a[key].shape == e[key].shape, key
        assert np.array_equal(a[key], e[key]), key


def test_original_rhymes_naming_loads_identically(pair, tmp_path):
    tensors = read_tensors(os.path.join(pair.directory, "model.safetensors"))
    config = load_json(os.path.join(pair.directory, "config.json"))
    text = pair.ours.config.text_config
    renamed = original_tensors(tensors, text.num_hidden_layers, text.head_dim)
    assert not any(k.startswith("vision_tower.post_layernorm") or k.startswith("vision_tower.encoder") for k in renamed)
    assert any(".ln_kv." in k for k in renamed) and any(".ffn." in k for k in renamed)
    assert any(".ln_ffn." in k for k in renamed)
    directory = write_checkpoint(tmp_path / "original", renamed, original_config(config))
    loaded = aria_jax.AriaForConditionalGeneration.from_pretrained(directory, dtype="float32")
    assert loaded.config == pair.ours.config
    assert_params_identical(loaded.params, pair.ours.params)


def test_transformers_5_naming_loads_identically(pair, tmp_path):
    tensors = read_tensors(os.path.join(pair.directory, "model.safetensors"))
    renamed = {rename(k, TO_TRANSFORMERS_5): v for k, v in tensors.items()}
    # The renames are transformers' own: the same names and tensors as its state_dict.
    state = pair.reference.state_dict()
    assert sorted(renamed) == sorted(state)
    for key, value in renamed.items():
        assert np.array_equal(value, state[key].numpy()), key
    directory = write_checkpoint(tmp_path / "t5", renamed, load_json(os.path.join(pair.directory, "config.json")))
    loaded = aria_jax.AriaForConditionalGeneration.from_pretrained(directory, dtype="float32")
    assert_params_identical(loaded.params, pair.ours.params)


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def text_only_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("text_only")
    make_text_model(directory, seed=5)
    return directory


def test_text_only_checkpoint_refused(text_only_dir):
    with pytest.raises((aria_jax.CheckpointError, ValueError)) as err:
        aria_jax.AriaForConditionalGeneration.from_pretrained(text_only_dir, dtype="float32")
    message = error_message(err)
    assert "vision" in message and "weights" in message, message


def test_text_only_weights_under_a_multimodal_config_refused(text_only_dir, tmp_path):
    """Text-only weights next to a multimodal config.json: the loader says there are no vision
    tower weights and points at the text model class."""
    tensors = read_tensors(os.path.join(text_only_dir, "model.safetensors"))
    text_config = load_json(os.path.join(text_only_dir, "config.json"))
    multimodal = {
        "architectures": ["AriaForConditionalGeneration"],
        "model_type": "aria",
        "image_token_index": 9,
        "projector_patch_to_query_dict": {"1": 2, "4": 4},
        "text_config": text_config,
        "vision_config": {
            "model_type": "idefics3_vision",
            "hidden_size": 32,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "intermediate_size": 64,
            "image_size": 28,
            "patch_size": 14,
        },
    }
    directory = write_checkpoint(tmp_path / "text_weights", tensors, multimodal)
    with pytest.raises(aria_jax.CheckpointError) as err:
        aria_jax.AriaForConditionalGeneration.from_pretrained(directory, dtype="float32")
    message = error_message(err)
    assert "vision_tower" in message and "AriaTextForCausalLM" in message, message


MISSING = "vision_tower.encoder.layers.0.mlp.fc2.bias"


@pytest.mark.parametrize("naming", ["hub", "transformers_5", "original"])
@pytest.mark.parametrize("pair", ["s140_p14_mha_top1"], indirect=True)
def test_missing_vision_key_named(pair, naming, tmp_path):
    tensors = read_tensors(os.path.join(pair.directory, "model.safetensors"))
    config = load_json(os.path.join(pair.directory, "config.json"))
    del tensors[MISSING]
    if naming == "transformers_5":
        tensors = {rename(k, TO_TRANSFORMERS_5): v for k, v in tensors.items()}
        spelled = [rename(MISSING, TO_TRANSFORMERS_5)]
    elif naming == "original":
        tensors = original_tensors(
            tensors, pair.ours.config.text_config.num_hidden_layers, pair.ours.config.text_config.head_dim
        )
        config = original_config(config)
        # The checkpoint's own spelling, or the canonical (hub) one.
        spelled = [rename(MISSING, TO_ORIGINAL), MISSING]
    else:
        spelled = [MISSING]
    directory = write_checkpoint(tmp_path / naming, tensors, config)
    with pytest.raises(aria_jax.CheckpointError) as err:
        aria_jax.AriaForConditionalGeneration.from_pretrained(directory, dtype="float32")
    message = error_message(err)
    assert "missing" in message and any(re.search(rf"{re.escape(s)}\b", message) for s in spelled), message


def test_image_token_count_mismatch(pair):
    """Too many or too few image tokens: a ValueError naming both counts; the rejected request
    leaves the model usable, with the same logits as before."""
    case = pair.cases["full_size_two_images_and_split"]
    before = np.asarray(
        pair.ours(
            case.input_ids,
            attention_mask=case.attention_mask,
            pixel_values=case.pixel_values,
            pixel_mask=case.pixel_mask,
        ).logits
    )
    tokens = int((case.input_ids == IMAGE_TOKEN_ID).sum())
    side = case.pixel_values.shape[-1]
    features = len(case.pixel_values) * pair.cfg.projector[(side // pair.cfg.vision["patch_size"]) ** 2]
    assert tokens == features
    text_position = np.argwhere((case.input_ids != IMAGE_TOKEN_ID) & (case.attention_mask == 1))[-1]
    image_position = np.argwhere(case.input_ids == IMAGE_TOKEN_ID)[0]
    for position, token, count in ((text_position, IMAGE_TOKEN_ID, tokens + 1), (image_position, 5, tokens - 1)):
        ids = case.input_ids.copy()
        ids[tuple(position)] = token
        with pytest.raises(ValueError) as err:
            pair.ours(
                ids, attention_mask=case.attention_mask, pixel_values=case.pixel_values, pixel_mask=case.pixel_mask
            )
        message = error_message(err)
        assert re.search(rf"\b{count}\b", message) and re.search(rf"\b{features}\b", message), message
    after = np.asarray(
        pair.ours(
            case.input_ids,
            attention_mask=case.attention_mask,
            pixel_values=case.pixel_values,
            pixel_mask=case.pixel_mask,
        ).logits
    )
    np.testing.assert_array_equal(after, before)
    assert_close(
        after,
        reference_logits(pair.reference, case),
        case.attention_mask.astype(bool),
        what=f"{pair.name} logits after rejected requests",
    )
