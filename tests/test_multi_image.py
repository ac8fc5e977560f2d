"""Several images per sample, and generation, against the HF reference path, for each backbone family.

Reference: the chat text with each image's `<|image_pad|>` repeated N_i times BEFORE tokenization (what the HF
processor does), tokenized with padding by the tokenizer itself, run through the family's own model with
`mm_token_type_ids` so that HF computes the M-RoPE positions (and Qwen3-VL's deepstack inputs) itself; attention
maps pooled by hand from eager `output_attentions` over the grounded image's tokens; generation by
`...ForConditionalGeneration.generate` on that expanded input.
"""

from __future__ import annotations

import pytest
import torch
from test_lmm_forward import encode  # padded ids and mask_ids from character offsets

from flmm_model.backbones import PRESETS, adapter_for, load_image_processor
from flmm_model.build import build_qwen, load_tokenizer
from flmm_model.modeling.lmm import FrozenQwenLMM

# Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE
FAMILY_PRESETS = ["qwen2_vl_tiny", "tiny", "qwen3_vl_tiny", "qwen3_vl_moe_tiny", "qwen3_5_tiny", "qwen3_5_moe_tiny"]
# (photos of the sample, phrases, grounded image): batches mix samples with one and with two images.
SAMPLES = [([0], ["the cup of coffee", "the saucer"], 0), ([3, 2], ["the cat", "a man in a suit"], 1),
           ([1, 3], ["the flag"], 0)]
GENERATE = dict(max_new_tokens=6, do_sample=False)


def generate_options(tokenizer) -> dict:
    """Greedy, 6 tokens, stopping at the vocabulary's <|im_end|> (151645 in Qwen2's, 248046 in Qwen3.5's)."""
    return dict(GENERATE, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id)


def chat_text(num_pads: list[int] | None, num_images: int, phrases: list[str], adapter):
    """Chat text (compact when num_pads is None, else N_i pads per image) and each phrase's character span."""
    blocks = "".join(adapter.image_block.replace("<|image_pad|>", "<|image_pad|>" * (n if num_pads else 1))
                     for n in (num_pads or [1] * num_images))
    text = f"<|im_start|>system\n{adapter.default_system}<|im_end|>\n" if adapter.default_system else ""
    text += f"<|im_start|>user\n{blocks}Describe the images.<|im_end|>\n<|im_start|>assistant\n"
    return with_answer(text, phrases)


def with_answer(text: str, phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """`text` + the answer "p0. p1." + the end of the turn, and each phrase's character span."""
    spans = []
    for k, phrase in enumerate(phrases):
        text += ". " if k else ""
        spans.append((len(text), len(text) + len(phrase)))
        text += phrase
    return text + ".<|im_end|>\n", spans


@pytest.fixture(scope="module", params=FAMILY_PRESETS)
def preset(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def family_tokenizer(preset):
    """The family's bundled real tokenizer (Qwen3.5 has its own vocabulary)."""
    return load_tokenizer(backbone=preset)


@pytest.fixture(scope="module")
def family(preset, photos):
    adapter = adapter_for(PRESETS[preset][0])
    image_processor = load_image_processor(adapter, min_pixels=56 * 56, max_pixels=168 * 168)
    pixel_values, grids = [], []
    for photo_ids, _, _ in SAMPLES:
        vision = image_processor(images=[photos[i] for i in photo_ids], return_tensors="pt")
        pixel_values.append(vision["pixel_values"])
        grids.append(vision["image_grid_thw"])
    merge = adapter.merge_size
    compact = [chat_text(None, len(p), phrases, adapter) for p, phrases, _ in SAMPLES]
    expanded = [chat_text([int(g.prod()) // merge**2 for g in grid], len(grid), phrases, adapter)
                for grid, (_, phrases, _) in zip(grids, SAMPLES, strict=True)]
    return dict(adapter=adapter, compact=compact, expanded=expanded, pixel_values=torch.cat(pixel_values),
                image_grid_thw=torch.cat(grids), images_per_sample=[len(g) for g in grids],
                grounded=[g for _, _, g in SAMPLES])


@pytest.fixture(scope="module")
def models(preset):
    """The model under test (through FrozenQwenLMM) and two HF references with the same weights."""
    return dict(lmm=FrozenQwenLMM(qwen=build_qwen(preset)), sdpa=build_qwen(preset).eval(),
                eager=build_qwen(preset, attn_implementation="eager").eval())


def hf_reference(models, family_tokenizer, family, padding_side):
    texts, spans = zip(*family["expanded"], strict=True)
    ids, attn, mask_ids = encode(family_tokenizer, list(texts), spans, padding_side)
    model = models["sdpa"]
    image_mask = ids == model.config.image_token_id
    kwargs = dict(input_ids=ids, attention_mask=attn, pixel_values=family["pixel_values"],
                  image_grid_thw=family["image_grid_thw"], mm_token_type_ids=image_mask.long())
    with torch.no_grad():
        hidden = model.model(**kwargs, output_hidden_states=True)
        attentions = models["eager"].model(**kwargs, output_attentions=True).attentions
        positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=image_mask.long(),
                                                  image_grid_thw=family["image_grid_thw"], attention_mask=attn)
    merge = model.config.vision_config.spatial_merge_size
    maps, grid_hw = [], []
    first = 0
    for b, count in enumerate(family["images_per_sample"]):
        image = first + family["grounded"][b]
        first += count
        _, h, w = (family["image_grid_thw"][image] // torch.tensor([1, merge, merge])).tolist()
        grid_hw.append((h, w))
        # The grounded image's tokens: its run among the sample's image-token runs (independent of the model code).
        positions_b = image_mask[b].nonzero().flatten().tolist()
        runs, run = [], [positions_b[0]]
        for p in positions_b[1:]:
            if p == run[-1] + 1:
                run.append(p)
            else:
                runs.append(run)
                run = [p]
        runs.append(run)
        image_positions = torch.tensor(runs[family["grounded"][b]])
        assert len(runs) == count and image_positions.numel() == h * w
        per_object = []
        for k in range(int(mask_ids[b].max()) + 1):
            rows = (mask_ids[b] == k).nonzero().flatten()
            per_object.append(torch.stack([layer[b, head][rows][:, image_positions].mean(0).reshape(h, w)
                                           for layer in attentions for head in range(layer.shape[1])]))
        maps.append(torch.stack(per_object))
    return dict(ids=ids, attn=attn, mask_ids=mask_ids, positions=positions, maps=maps, grid_hw=grid_hw,
                last_hidden_state=hidden.last_hidden_state)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("key", ["compact", "expanded"])
def test_multi_image_forward_matches_hf_reference(preset, models, family_tokenizer, family, padding_side, key):
    ref = hf_reference(models, family_tokenizer, family, padding_side)
    texts, spans = zip(*family[key], strict=True)
    ids, attn, mask_ids = encode(family_tokenizer, list(texts), spans, padding_side)
    out = models["lmm"](ids, attn, family["pixel_values"], family["image_grid_thw"], mask_ids,
                        grounded_image=family["grounded"])

    assert torch.equal(out.input_ids, ref["ids"])
    assert torch.equal(out.attention_mask, ref["attn"])
    assert torch.equal(out.mask_ids, ref["mask_ids"])
    assert torch.equal(out.position_ids, ref["positions"])
    assert out.grid_hw == ref["grid_hw"] and out.grounded_image == family["grounded"]
    valid = ref["attn"].bool()
    # Qwen3.5: the vision tower's packed attention and HF's per-image calls round differently, and the difference
    # passes through its recurrent layers (up to 3e-5); the bar for the family is 1e-4.
    tolerance = 1e-4 if preset.startswith("qwen3_5") else 1e-5
    torch.testing.assert_close(out.last_hidden_state[valid], ref["last_hidden_state"][valid], atol=tolerance,
                               rtol=tolerance)
    map_tolerance = 1e-4 if preset.startswith("qwen3_5") else 1e-5  # see test_lmm_forward: eager vs sdpa rounding
    for ours, expected in zip(out.attention_maps, ref["maps"], strict=True):
        assert ours.shape == expected.shape
        torch.testing.assert_close(ours, expected, atol=map_tolerance, rtol=1e-4)


def test_grounded_image_defaults_to_the_first(models, family_tokenizer, family):
    texts, spans = zip(*family["compact"], strict=True)
    ids, attn, mask_ids = encode(family_tokenizer, list(texts), spans, "right")
    lmm = models["lmm"]
    default = lmm(ids, attn, family["pixel_values"], family["image_grid_thw"], mask_ids)
    first = lmm(ids, attn, family["pixel_values"], family["image_grid_thw"], mask_ids, grounded_image=[0, 0, 0])
    second = lmm(ids, attn, family["pixel_values"], family["image_grid_thw"], mask_ids, grounded_image=[0, 1, 1])
    assert default.grounded_image == [0, 0, 0]
    for a, b in zip(default.attention_maps, first.attention_maps, strict=True):
        assert torch.equal(a, b)
    assert second.attention_maps[1].shape[-2:] != first.attention_maps[1].shape[-2:]  # chelsea vs astronaut grid


def hf_generate(models, family_tokenizer, family, samples):
    """HF generate on the processor-style expanded, left-padded input of the chosen samples."""
    texts = [family["expanded"][b][0].split("<|im_start|>assistant\n")[0] + "<|im_start|>assistant\n"
             for b in samples]
    family_tokenizer.padding_side = "left"
    try:
        enc = family_tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        family_tokenizer.padding_side = "right"
    pixel_values, grids = select_images(family, samples)
    model = models["sdpa"]
    options = dict(generate_options(family_tokenizer), return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        with_mrope = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                    pixel_values=pixel_values, image_grid_thw=grids,
                                    mm_token_type_ids=(enc["input_ids"] == model.config.image_token_id).long(),
                                    **options)
        without_mrope = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                       pixel_values=pixel_values, image_grid_thw=grids, **options)
    length = enc["input_ids"].shape[1]
    return (with_mrope.sequences[:, length:], without_mrope.sequences[:, length:], with_mrope.scores[0],
            without_mrope.scores[0])


def select_images(family, samples):
    """pixel_values and image_grid_thw rows of the chosen samples' images, in sample order."""
    counts = family["images_per_sample"]
    grids, rows = [], []
    patches = family["image_grid_thw"].prod(-1).tolist()
    for b in samples:
        first = sum(counts[:b])
        for image in range(first, first + counts[b]):
            grids.append(family["image_grid_thw"][image])
            start = sum(patches[:image])
            rows.append(family["pixel_values"][start:start + patches[image]])
    return torch.cat(rows), torch.stack(grids)


@pytest.mark.parametrize("samples", [[0], [1], [0, 1, 2]], ids=["one_image", "two_images", "batch_of_1_2_2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_generate_matches_hf_generate(preset, models, family_tokenizer, family, samples, padding_side):
    expected, without_mrope, first_scores, first_scores_without_mrope = hf_generate(models, family_tokenizer, family,
                                                                                    samples)
    texts = [family["compact"][b][0].split("<|im_start|>assistant\n")[0] + "<|im_start|>assistant\n" for b in samples]
    ids, attn, _ = encode(family_tokenizer, texts, [[] for _ in samples], padding_side)
    pixel_values, grids = select_images(family, samples)
    found = models["lmm"].generate(ids, attn, pixel_values, grids, **generate_options(family_tokenizer))
    assert found.shape == (len(samples), GENERATE["max_new_tokens"])
    assert torch.equal(found, expected)
    # The equality is a real check of the positions: HF's own 1-D fallback (no mm_token_type_ids) scores the first new
    # token otherwise, and decodes otherwise (but in the tiny Qwen3.5 models, whose 8 rotary dims per head in 2 of 8
    # layers move no argmax of these prompts).
    assert not torch.allclose(first_scores, first_scores_without_mrope)
    if not preset.startswith("qwen3_5"):
        assert not torch.equal(without_mrope, expected)


def test_generate_rejects_return_dict(models, family_tokenizer, family):
    texts, spans = zip(*family["compact"][:1], strict=True)
    ids, attn, _ = encode(family_tokenizer, list(texts), spans, "right")
    pixel_values, grids = select_images(family, [0])
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        models["lmm"].generate(ids, attn, pixel_values, grids, return_dict_in_generate=True)


# ---------------------------------------------------------------- bad input, per image: ValueError naming it


@pytest.fixture(scope="module")
def good(tokenizer, photos):
    adapter = adapter_for("qwen2_5_vl")
    image_processor = load_image_processor(adapter, min_pixels=56 * 56, max_pixels=168 * 168)
    texts, spans, pixel_values, grids = [], [], [], []
    for photo_ids, phrases, _ in SAMPLES[:2]:
        text, span = chat_text(None, len(photo_ids), phrases, adapter)
        texts.append(text)
        spans.append(span)
        vision = image_processor(images=[photos[i] for i in photo_ids], return_tensors="pt")
        pixel_values.append(vision["pixel_values"])
        grids.append(vision["image_grid_thw"])
    ids, attn, mask_ids = encode(tokenizer, texts, spans, "right")
    return dict(input_ids=ids, attention_mask=attn, pixel_values=torch.cat(pixel_values),
                image_grid_thw=torch.cat(grids), mask_ids=mask_ids)


@pytest.fixture(scope="module")
def tiny_lmm(tiny_qwen):
    return FrozenQwenLMM(qwen=build_qwen("tiny"))


def call(lmm, good, **changes):
    inputs = {k: v.clone() for k, v in good.items()}
    grounded = changes.pop("grounded_image", None)
    inputs.update(changes)
    return lmm(**inputs, grounded_image=grounded)


def test_bad_input_missing_grid_row(tiny_lmm, good):
    with pytest.raises(ValueError, match=r"image_grid_thw: expected one \(t, H, W\) row per image, shape \(3, 3\) "
                                         r"for the image blocks of the batch \(per sample: \[1, 2\]\)"):
        call(tiny_lmm, good, image_grid_thw=good["image_grid_thw"][:2])


def test_bad_input_wrong_pad_count_names_the_image(tiny_lmm, good):
    ids = good["input_ids"]
    pads = (ids[1] == tiny_lmm.image_token_id).nonzero().flatten()
    second = int(pads[1])  # the second image's placeholder: make it 3 pads
    row = torch.cat([ids[1, :second], ids[1, second:second + 1].repeat(3), ids[1, second + 1:]])
    new_ids = torch.nn.functional.pad(ids, (0, 2), value=0)
    new_ids[1] = row
    attn = torch.nn.functional.pad(good["attention_mask"], (0, 2), value=0)
    attn[1] = 1
    mask_ids = torch.nn.functional.pad(good["mask_ids"], (0, 2), value=-1)
    mask_ids[1] = torch.cat([good["mask_ids"][1, :second], torch.full((2,), -1), good["mask_ids"][1, second:]])
    with pytest.raises(ValueError, match=r"sample 1, image 2: found 3 <\|image_pad\|> tokens, expected 1 \(compact\)"):
        call(tiny_lmm, good, input_ids=new_ids, attention_mask=attn, mask_ids=mask_ids)


def test_bad_input_second_image_grid(tiny_lmm, good):
    grid = good["image_grid_thw"].clone()
    grid[2, 0] = 2
    with pytest.raises(ValueError, match="sample 1, image 2: image_grid_thw t = 2, expected 1"):
        call(tiny_lmm, good, image_grid_thw=grid)


def test_bad_input_grounded_image_out_of_range(tiny_lmm, good):
    with pytest.raises(ValueError, match=r"sample 0: grounded_image 1 does not exist; the sample holds 1 image"):
        call(tiny_lmm, good, grounded_image=[1, 0])
    with pytest.raises(ValueError, match=r"grounded_image: expected one image index per sample \(2\), found 1"):
        call(tiny_lmm, good, grounded_image=[0])


def test_bad_input_vision_end_missing_between_images(tiny_lmm, good):
    ids = good["input_ids"].clone()
    end = int((ids[1] == tiny_lmm.vision_end_token_id).nonzero()[0, 0])
    ids[1, end] = tiny_lmm.image_token_id  # first block runs into the second one's start
    with pytest.raises(ValueError, match=r"sample 1: image pads must sit in runs between <\|vision_start\|> and "
                                         r"<\|vision_end\|>"):
        call(tiny_lmm, good, input_ids=ids)
