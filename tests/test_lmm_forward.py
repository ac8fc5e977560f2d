"""The LMM stage against the HF reference path, for each backbone family (one tiny random model per family).

Reference: the chat text with `<|image_pad|>` repeated N times BEFORE tokenization (what the HF processor does),
tokenized with padding by the tokenizer itself, run through the family's own `...VLModel` with `mm_token_type_ids`
so that HF computes the M-RoPE positions (and, for Qwen3-VL, the deepstack inputs) itself; attention maps are
pooled by hand from eager `output_attentions`.
"""

from __future__ import annotations

import pytest
import torch

from flmm_model.backbones import PRESETS, adapter_for, load_image_processor
from flmm_model.build import build_qwen, load_tokenizer
from flmm_model.modeling.lmm import FrozenQwenLMM

# Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 (hybrid: maps from its full-attention layers), Qwen3.5-MoE
FAMILY_PRESETS = ["qwen2_vl_tiny", "tiny", "qwen3_vl_tiny", "qwen3_vl_moe_tiny", "qwen3_5_tiny", "qwen3_5_moe_tiny"]
PHRASES = [["the cup of coffee", "the saucer"], ["a man", "the flag", "his helmet"], ["the cat"]]


def chat(phrases: list[str], *, image_block: str, system: str | None) -> tuple[str, list[tuple[int, int]]]:
    """Chat text with the phrases joined in the assistant turn, and each phrase's character span.

    `system` None leaves the system turn out (Qwen3-VL's template when the conversation has none).
    """
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    text += f"<|im_start|>user\n{image_block}Please describe the image.<|im_end|>\n<|im_start|>assistant\n"
    spans = []
    for k, phrase in enumerate(phrases):
        if k:
            text += ". "
        spans.append((len(text), len(text) + len(phrase)))
        text += phrase
    return text + ".<|im_end|>\n", spans


def encode(tokenizer, texts, spans, padding_side):
    """Tokenize a batch with padding; mask_ids from character offsets (independent of the model code)."""
    tokenizer.padding_side = padding_side
    try:
        enc = tokenizer(texts, padding=True, return_offsets_mapping=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    mask_ids = torch.full_like(enc["input_ids"], -1)
    for b, sample_spans in enumerate(spans):
        for t, (start, end) in enumerate(enc["offset_mapping"][b].tolist()):
            if enc["attention_mask"][b, t] and end > start:
                for k, (s, e) in enumerate(sample_spans):
                    if start < e and end > s:
                        mask_ids[b, t] = k
    return enc["input_ids"], enc["attention_mask"], mask_ids


def make_batch(adapter, photos) -> dict:
    """Three photos of different sizes through the family's image processor; compact and expanded chat texts."""
    image_processor = load_image_processor(adapter, min_pixels=56 * 56, max_pixels=224 * 224)
    vision = image_processor(images=photos[:3], return_tensors="pt")
    grid = vision["image_grid_thw"]
    assert len({tuple(g) for g in grid.tolist()}) == 3, "the test needs three different image sizes"
    compact, expanded = [], []
    for phrases, (t, h, w) in zip(PHRASES, grid.tolist(), strict=True):
        pads = "<|image_pad|>" * (t * h * w // adapter.merge_size**2)
        compact.append(chat(phrases, image_block=adapter.image_block, system=adapter.default_system))
        expanded.append(chat(phrases, image_block=adapter.image_block.replace("<|image_pad|>", pads),
                             system=adapter.default_system))
    return dict(compact=compact, expanded=expanded, pixel_values=vision["pixel_values"], image_grid_thw=grid)


@pytest.fixture(scope="module", params=FAMILY_PRESETS)
def preset(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tokenizer(preset):
    """The family's bundled real tokenizer (Qwen3.5 has its own vocabulary)."""
    return load_tokenizer(backbone=preset)


@pytest.fixture(scope="module")
def adapter(preset):
    return adapter_for(PRESETS[preset][0])


@pytest.fixture(scope="module")
def batch(adapter, photos):
    return make_batch(adapter, photos)


@pytest.fixture(scope="module")
def reference_models(preset):
    """Two copies of the tiny model's weights: sdpa (hidden states) and eager (attention weights)."""
    return build_qwen(preset, attn_implementation="sdpa").eval(), build_qwen(preset, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def lmm(preset):
    return FrozenQwenLMM(qwen=build_qwen(preset), attn_capture="sdpa")


@pytest.fixture(scope="module")
def float64_models(preset):
    """The same weights in float64, ours and the HF sdpa reference: the hidden states are compared there, where kernel
    rounding drops out (MoE experts as eager loops in both). In float32 the vision towers' attention kernels (our
    packed call against HF's call per image) differ by ~5e-6, which Qwen3.5's tiny recurrent layers (init std 0.2)
    grow to ~1e-4 at the last layer."""
    ours, hf = build_qwen(preset).double(), build_qwen(preset, attn_implementation="sdpa").eval().double()
    if "moe" in preset:  # the default grouped-GEMM experts take float32 / bf16 / fp16 only
        ours.set_experts_implementation("eager")
        hf.set_experts_implementation("eager")
    return FrozenQwenLMM(qwen=ours, attn_capture="sdpa"), hf


def reference(models, tokenizer, batch, padding_side):
    """HF's outputs for the expanded texts: ids, mask, mask_ids, positions, hidden states (sdpa model) and, when an
    eager model is given, the pooled maps (None otherwise)."""
    sdpa_model, eager_model = models
    texts, spans = zip(*batch["expanded"], strict=True)
    ids, attn, mask_ids = encode(tokenizer, list(texts), spans, padding_side)
    image_mask = ids == sdpa_model.config.image_token_id
    kwargs = dict(input_ids=ids, attention_mask=attn, pixel_values=batch["pixel_values"].to(sdpa_model.dtype),
                  image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=image_mask.long())
    with torch.no_grad():
        hidden = sdpa_model.model(**kwargs, output_hidden_states=True)
        positions, _ = sdpa_model.model.get_rope_index(
            ids, mm_token_type_ids=image_mask.long(), image_grid_thw=batch["image_grid_thw"], attention_mask=attn
        )
    out = dict(ids=ids, attn=attn, mask_ids=mask_ids, positions=positions, maps=None,
               last_hidden_state=hidden.last_hidden_state, hidden_states=hidden.hidden_states)
    if eager_model is None:
        return out
    with torch.no_grad():
        attentions = eager_model.model(**kwargs, output_attentions=True).attentions
    # Eager `output_attentions` returns one map per softmax-attention layer: all layers, or Qwen3.5's full ones.
    text_config = sdpa_model.config.text_config
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
    assert len(attentions) == layer_types.count("full_attention")
    maps = []
    merge = sdpa_model.config.vision_config.spatial_merge_size
    for b in range(ids.shape[0]):
        _, h, w = (batch["image_grid_thw"][b] // torch.tensor([1, merge, merge])).tolist()
        image_positions = image_mask[b].nonzero().flatten()
        per_object = []
        for k in range(int(mask_ids[b].max()) + 1):
            rows = (mask_ids[b] == k).nonzero().flatten()
            channels = [layer[b, head][rows][:, image_positions].mean(0).reshape(h, w)
                        for layer in attentions for head in range(layer.shape[1])]
            per_object.append(torch.stack(channels))
        maps.append(torch.stack(per_object))
    return out | dict(maps=maps)


def run_lmm(lmm, tokenizer, batch, padding_side, key="compact"):
    texts, spans = zip(*batch[key], strict=True)
    ids, attn, mask_ids = encode(tokenizer, list(texts), spans, padding_side)
    return lmm(ids, attn, batch["pixel_values"].to(lmm.qwen.dtype), batch["image_grid_thw"], mask_ids)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("key", ["compact", "expanded"])
def test_lmm_forward_matches_hf_reference(preset, lmm, reference_models, float64_models, tokenizer, batch,
                                          padding_side, key):
    ref = reference(reference_models, tokenizer, batch, padding_side)
    out = run_lmm(lmm, tokenizer, batch, padding_side, key)

    assert torch.equal(out.input_ids, ref["ids"])
    assert torch.equal(out.attention_mask, ref["attn"])
    assert torch.equal(out.mask_ids, ref["mask_ids"])
    assert torch.equal(out.position_ids, ref["positions"])
    # The reference maps come from the eager model, whose hidden states differ from the sdpa model's by kernel
    # rounding; in Qwen3.5 that difference passes through its recurrent layers before the map layers (up to 2e-5).
    map_tolerance = 1e-4 if preset.startswith("qwen3_5") else 1e-5
    for b, ref_maps in enumerate(ref["maps"]):
        assert out.attention_maps[b].shape == ref_maps.shape
        torch.testing.assert_close(out.attention_maps[b], ref_maps, atol=map_tolerance, rtol=1e-4)

    # Hidden states in float64 (see `float64_models`): the last layer's, and every layer's at the phrase tokens.
    lmm64, sdpa64 = float64_models
    ref64 = reference((sdpa64, None), tokenizer, batch, padding_side)
    out64 = run_lmm(lmm64, tokenizer, batch, padding_side, key)
    valid = ref64["attn"].bool()
    assert out64.last_hidden_state.dtype == torch.float64
    torch.testing.assert_close(out64.last_hidden_state[valid], ref64["last_hidden_state"][valid], atol=1e-10,
                               rtol=1e-10)
    for b in range(len(PHRASES)):
        for k, states in enumerate(out64.phrase_hidden_states[b]):
            rows = ref64["mask_ids"][b] == k
            expected = torch.stack([h[b][rows] for h in ref64["hidden_states"][1:]])  # (layers, T_k, D)
            torch.testing.assert_close(states, expected, atol=1e-10, rtol=1e-10)


def test_sdpa_and_eager_capture_agree(preset, tokenizer, batch):
    sdpa = run_lmm(FrozenQwenLMM(qwen=build_qwen(preset), attn_capture="sdpa"), tokenizer, batch, "left")
    eager = run_lmm(FrozenQwenLMM(qwen=build_qwen(preset), attn_capture="eager"), tokenizer, batch, "left")
    for a, b in zip(sdpa.attention_maps, eager.attention_maps, strict=True):
        assert (a - b).abs().max() <= 1e-5
    valid = sdpa.attention_mask.bool()
    # Qwen3.5: the two attention kernels' rounding passes through 6 recurrent (gated delta rule) layers of the tiny
    # model (init std 0.2): up to 2e-5 apart; the bar for the family is 1e-4.
    tolerance = 1e-4 if preset.startswith("qwen3_5") else 1e-5
    torch.testing.assert_close(sdpa.last_hidden_state[valid], eager.last_hidden_state[valid], atol=tolerance,
                               rtol=tolerance)


def test_attention_maps_layout(lmm, tokenizer, batch):
    out = run_lmm(lmm, tokenizer, batch, "right")
    config = lmm.qwen.config.text_config
    merge = lmm.merge_size
    for maps, phrases, (_, h, w) in zip(out.attention_maps, PHRASES, batch["image_grid_thw"].tolist(), strict=True):
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        assert maps.shape == (len(phrases), layer_types.count("full_attention") * config.num_attention_heads,
                              h // merge, w // merge)
        assert maps.dtype == torch.float32
        assert torch.all(maps.flatten(2).sum(-1) <= 1 + 1e-5)  # a share of a softmax row


def test_qwen_is_frozen(lmm):
    lmm.train()
    assert not lmm.qwen.training
    assert all(not m.training for m in lmm.qwen.modules())
    assert not any(p.requires_grad for p in lmm.qwen.parameters())


def test_unknown_capture_mode_is_rejected(lmm):
    with pytest.raises(ValueError, match="attn_capture"):
        FrozenQwenLMM(qwen=lmm.qwen, attn_capture="flash")


# ---------------------------------------------------------------- bad input: ValueError before the model runs


@pytest.fixture(scope="module")
def good(tokenizer, batch):
    texts, spans = zip(*batch["compact"][:2], strict=True)
    ids, attn, mask_ids = encode(tokenizer, list(texts), spans, "right")
    grid = batch["image_grid_thw"][:2]
    rows = int(grid.prod(-1).sum())
    return dict(input_ids=ids, attention_mask=attn, pixel_values=batch["pixel_values"][:rows],
                image_grid_thw=grid, mask_ids=mask_ids)


def call_with(lmm, good, **changes):
    inputs = {k: v.clone() for k, v in good.items()}
    inputs.update(changes)
    return lmm(**inputs)


def _replace_first(ids, sample, old, new):
    ids = ids.clone()
    position = (ids[sample] == old).nonzero()[0, 0]
    ids[sample, position] = new
    return ids


def test_bad_input_no_placeholder(lmm, good):
    ids = _replace_first(good["input_ids"], 1, lmm.image_token_id, 100)
    with pytest.raises(ValueError, match=r"sample 1: no <\|image_pad\|> placeholder.*expected 1"):
        call_with(lmm, good, input_ids=ids)


def test_bad_input_stray_vision_start(lmm, good):
    ids = good["input_ids"].clone()
    ids[0, 1] = lmm.vision_start_token_id  # a block start without pads and end (several images: test_multi_image.py)
    with pytest.raises(ValueError, match="sample 0: image pads must sit in runs.*found 2 vision starts, 1 vision ends"):
        call_with(lmm, good, input_ids=ids)


def test_bad_input_wrong_pad_count(lmm, adapter, tokenizer, batch):
    text, spans = chat(PHRASES[0], image_block=adapter.image_block.replace("<|image_pad|>", "<|image_pad|>" * 3),
                       system=adapter.default_system)
    ids, attn, mask_ids = encode(tokenizer, [text], [spans], "right")
    grid = batch["image_grid_thw"][:1]
    n = int(grid.prod()) // lmm.merge_size**2
    with pytest.raises(ValueError, match=rf"sample 0: found 3 <\|image_pad\|> tokens, expected 1 \(compact\) or {n}"):
        lmm(ids, attn, batch["pixel_values"][: int(grid.prod())], grid, mask_ids)


def test_bad_input_grid_rows(lmm, good):
    with pytest.raises(ValueError, match=r"image_grid_thw: expected one \(t, H, W\) row per image, shape \(2, 3\)"):
        call_with(lmm, good, image_grid_thw=good["image_grid_thw"][:1])


def test_bad_input_pixel_rows(lmm, good):
    expected = int(good["image_grid_thw"].prod(-1).sum())
    with pytest.raises(ValueError, match=rf"pixel_values: expected {expected} rows"):
        call_with(lmm, good, pixel_values=good["pixel_values"][:-4])


def test_bad_input_pixel_patch_size(lmm, adapter, good):
    assert lmm.patch_dim == adapter.patch_dim  # 1176 for 14-pixel patches, 1536 for 16-pixel ones
    with pytest.raises(ValueError, match=f"pixel_values: expected {adapter.patch_dim} values per patch"):
        call_with(lmm, good, pixel_values=good["pixel_values"][:, : adapter.patch_dim // 2])


def test_bad_input_grid_not_divisible_by_merge(lmm, good):
    grid = good["image_grid_thw"].clone()
    grid[1, 2] += 1
    merge = lmm.merge_size
    with pytest.raises(ValueError, match=f"sample 1: image_grid_thw .* divisible by the spatial merge size {merge}"):
        call_with(lmm, good, image_grid_thw=grid)


def test_bad_input_mask_ids_shape(lmm, good):
    with pytest.raises(ValueError, match="mask_ids: expected the shape of input_ids"):
        call_with(lmm, good, mask_ids=good["mask_ids"][:, :-1])


def test_bad_input_object_without_token(lmm, good):
    mask_ids = good["mask_ids"].clone()
    mask_ids[0][mask_ids[0] == 0] = -1  # object 0 loses its tokens, object 1 keeps them
    with pytest.raises(ValueError, match="sample 0: object index 0 has no token"):
        call_with(lmm, good, mask_ids=mask_ids)


def test_bad_input_phrase_token_on_padding(lmm, good):
    ids = torch.nn.functional.pad(good["input_ids"], (0, 1), value=0)  # one more padding column
    attn = torch.nn.functional.pad(good["attention_mask"], (0, 1), value=0)
    mask_ids = torch.nn.functional.pad(good["mask_ids"], (0, 1), value=-1)
    mask_ids[1, -1] = 0
    with pytest.raises(ValueError, match=r"sample 1: 1 phrase tokens .* lie on padding"):
        call_with(lmm, good, input_ids=ids, attention_mask=attn, mask_ids=mask_ids)


def test_bad_input_truncated_inside_vision_block(lmm, tokenizer, batch):
    texts, spans = zip(*batch["expanded"][:1], strict=True)
    ids, attn, mask_ids = encode(tokenizer, list(texts), spans, "right")
    # max_length truncation that cuts the pad run: keep the start and 5 pads only.
    cut = int((ids[0] == lmm.image_token_id).nonzero()[0, 0]) + 5
    grid = batch["image_grid_thw"][:1]
    pixels = batch["pixel_values"][: int(grid.prod())]
    with pytest.raises(ValueError, match="sample 0: the sequence ends inside the vision block.*truncated"):
        lmm(ids[:, :cut], attn[:, :cut], pixels, grid, mask_ids[:, :cut])


def test_capture_stays_fp32_under_autocast(lmm, tokenizer, batch):
    """Training runs the LMM under a bf16 autocast: the recomputed softmax rows and the maps must stay fp32."""
    from flmm_model.modeling.attention import CaptureState, PhraseQueries, _phrase_weight_rows

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 12, 16, generator=generator)  # (B, heads, L, d)
    key = torch.randn(2, 2, 12, 16, generator=generator)  # (B, kv_heads, L, d)
    mask_ids = torch.full((2, 12), -1)
    mask_ids[:, 8:10] = 0
    image_mask = torch.zeros(2, 12, dtype=torch.bool)
    image_mask[:, 2:6] = True
    queries = PhraseQueries.build(mask_ids=mask_ids, image_mask=image_mask, attention_mask=torch.ones(2, 12),
                                  num_objects=1)
    expected = _phrase_weight_rows(query, key, 0.25, queries)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = _phrase_weight_rows(query, key, 0.25, queries)
        capture = CaptureState(queries=queries)
        capture.add_rows(found)
    assert found.dtype == torch.float32 and torch.equal(found, expected)
    assert capture.layer_maps[0].dtype == torch.float32

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_lmm(lmm, tokenizer, batch, "right")
    assert all(maps.dtype == torch.float32 for maps in out.attention_maps)


def test_qwen3_vl_hidden_states_depend_on_deepstack_inputs(photos):
    """Qwen3-VL's decoder runs without its deepstack inputs too, silently computing something else: the equivalence
    above can only pass if `run_decoder` passes them, because leaving them out moves the hidden states far."""
    qwen, tokenizer = build_qwen("qwen3_vl_tiny"), load_tokenizer(backbone="qwen3_vl")
    lmm = FrozenQwenLMM(qwen=qwen)
    batch = make_batch(lmm.adapter, photos)
    out = run_lmm(lmm, tokenizer, batch, "left")

    vision = lmm.adapter.encode_images(qwen, batch["pixel_values"], batch["image_grid_thw"])
    assert len(vision.deepstack_embeds) == len(qwen.config.vision_config.deepstack_visual_indexes) == 2
    image_mask = out.input_ids == lmm.image_token_id
    embeds = qwen.model.get_input_embeddings()(out.input_ids).masked_scatter(image_mask[..., None], vision.image_embeds)
    with torch.no_grad():
        without_deepstack = qwen.model.language_model(
            inputs_embeds=embeds, attention_mask=out.attention_mask, position_ids=out.position_ids, use_cache=False
        ).last_hidden_state
    valid = out.attention_mask.bool()
    difference = (without_deepstack - out.last_hidden_state)[valid].abs()
    assert difference.max() > 1e-2  # 1000x the equivalence tolerance
    phrase_rows = out.mask_ids[valid] >= 0
    assert difference[phrase_rows].max() > 1e-2  # the text tokens that read the image feel it too
