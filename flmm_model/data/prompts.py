"""The Qwen2.5-VL chat prompt around a grounded answer, and the per-token object index `mask_ids`.

An answer is a list of parts `(text, k)`: `k >= 0` marks the text of object k (a referring expression or a noun
phrase of a narrative), `k = -1` marks glue text (". ", words between noun phrases). The whole chat string is
tokenized once, and character offsets map tokens back to parts, so `mask_ids` is right at subword boundaries
(" red" belongs to "the red circle" although its leading space does not) and identical between training data and
the model's `segment(image, phrases)`.

User text (system prompt, instruction, answer) never becomes a control token: the check runs on each text, on the
answer joined from its parts (a part ending "<|im_" before one starting "end|>" would otherwise spell `<|im_end|>`),
and finally on the token ids themselves, which must hold exactly the template's own control tokens. No construction
of parts can end a turn or open a new one.

Conversations (`build_chat_prompt`, `encode_chat`): what the chat template renders for system, earlier turns and a
user turn with any number of images, for generation (`FrozenQwenSAM.chat`) and for the teacher-forced grounding
forward over prompt + generated answer, with the same offset-based marking and the same control-token checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from flmm_model.config import DEFAULT_INSTRUCTION
from flmm_model.data.clips import ClipFrames
from flmm_model.errors import InputError

DEFAULT_SYSTEM = "You are a helpful assistant."  # Qwen2-VL's and Qwen2.5-VL's chat-template default

IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_BLOCK = "<|vision_start|><|video_pad|><|vision_end|>"
VIDEO_PAD = "<|video_pad|>"


def video_instruction(instruction: str) -> str:
    """The instruction of a clip sample: the image instruction with "video" for "image" (F-LMM has no video; its
    "Please give me a brief description of the image." becomes "... of the video.")."""
    return instruction.replace("image", "video")


DEFAULT_VIDEO_INSTRUCTION = video_instruction(DEFAULT_INSTRUCTION)

_END_PUNCTUATION = (".", "!", "?")


def expression_parts(phrases: list[str]) -> list[tuple[str, int]]:
    """Referring expressions joined the F-LMM way: "expr0. expr1. expr2." with expression k as part k.

    Each expression is stripped and its inner whitespace collapsed; one that already ends with ".", "!" or "?"
    gets no extra period.

    Args:
        phrases: K >= 1 referring expressions, in object order.

    Returns:
        Parts `[(phrases[0], 0), (". ", -1), (phrases[1], 1), ..., (".", -1)]`.

    Raises:
        InputError (a ValueError): no phrases, a non-string, or an empty phrase (named by its index).
    """
    if len(phrases) == 0:
        raise InputError("expression_parts: expected at least one phrase, found none")
    parts: list[tuple[str, int]] = []
    for k, phrase in enumerate(phrases):
        if not isinstance(phrase, str):
            raise InputError(f"expression_parts: phrase {k} must be a str, found {type(phrase).__name__}")
        text = " ".join(phrase.split())
        if not text:
            raise InputError(f"expression_parts: phrase {k} is empty ({phrase!r})")
        if k > 0:
            parts.append((" " if parts[-1][0].endswith(_END_PUNCTUATION) else ". ", -1))
        parts.append((text, k))
    if not parts[-1][0].endswith(_END_PUNCTUATION):
        parts.append((".", -1))
    return parts


def phrases_of(parts: list[tuple[str, int]]) -> list[str]:
    """The K object texts of `parts`, in object order (parts of one object are concatenated)."""
    num_objects = _check_parts(parts)
    texts = [""] * num_objects
    for text, k in parts:
        if k >= 0:
            texts[k] += text
    return [text.strip() for text in texts]


def chat_prefix(*, instruction: str = DEFAULT_INSTRUCTION, system: str | None = DEFAULT_SYSTEM,
                video: bool = False) -> str:
    """The Qwen-VL chat text up to the assistant's answer, with one compact image placeholder (what the chat template
    renders for one user turn holding the image and then the instruction). `system=None`: no system turn (Qwen3-VL's
    template default). `video`: a clip's compact block (`VIDEO_BLOCK`) instead of the image's."""
    system_turn = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return (f"{system_turn}<|im_start|>user\n{VIDEO_BLOCK if video else IMAGE_BLOCK}{instruction}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def encode_grounded(
    tokenizer: PreTrainedTokenizerBase,
    parts: list[tuple[str, int]],
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    system: str | None = DEFAULT_SYSTEM,
    max_length: int | None = None,
    video: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize the chat with a grounded answer and mark each object's tokens.

    The text is `chat_prefix(...) + answer + "<|im_end|>\\n"` with answer = the parts concatenated, tokenized as
    one string. Token t gets `mask_ids[t] = k` when its character span overlaps a non-space character of a part
    with object k (if it overlaps several objects, the one with most characters wins), else -1.

    Args:
        tokenizer: the Qwen2/2.5 tokenizer (fast, for offsets).
        parts: `(text, k)` pieces of the answer; the k >= 0 must be exactly 0..K-1 (K >= 1), each with non-space
            text. An object may span several parts.
        instruction: the user's text after the image.
        system: the system prompt (None: no system turn).
        max_length: if given, the longest allowed sequence (counted with the single compact `<|image_pad|>`).
        video: the sample is a clip: one compact `<|video_pad|>` block in place of the image's.

    Returns:
        input_ids: (L,) long, with exactly one `<|image_pad|>` (the model expands it to the image's tokens).
        mask_ids: (L,) long in [-1, K-1]; every object has at least one token.

    Raises:
        InputError (a ValueError): bad parts, a special token (e.g. "<|image_pad|>") inside user text or formed by
            joining parts, an object that gets no token, or a sequence longer than `max_length` (nothing is ever
            truncated).
    """
    num_objects = _check_parts(parts)
    if system is not None:
        reject_control_tokens(tokenizer, system, what="system prompt")
    reject_control_tokens(tokenizer, instruction, what="instruction")
    for index, (text, k) in enumerate(parts):
        reject_control_tokens(tokenizer, text, what=f"part {index} (object {k})")
    prefix = chat_prefix(instruction=instruction, system=system, video=video)
    answer = "".join(text for text, _ in parts)
    reject_control_tokens(tokenizer, answer, what="the answer joined from its parts")
    full_text = prefix + answer + "<|im_end|>\n"

    # Object index per character: only non-space characters of object parts count.
    char_object = np.full(len(full_text), -1, dtype=np.int64)  # (num_chars,)
    cursor = len(prefix)
    for text, k in parts:
        if k >= 0:
            is_visible = np.array([not char.isspace() for char in text], dtype=bool)
            char_object[cursor:cursor + len(text)][is_visible] = k
        cursor += len(text)

    template = chat_prefix(instruction="", system="" if system is not None else None, video=video) + "<|im_end|>\n"
    return _encode_marked(tokenizer, full_text, char_object, template=template, num_images=1,
                          num_objects=num_objects, max_length=max_length, what="encode_grounded",
                          objects=f"parts: {parts}", pad=VIDEO_PAD if video else IMAGE_PAD)


def _encode_marked(tokenizer: PreTrainedTokenizerBase, full_text: str, char_object: np.ndarray, *, template: str,
                   num_images: int, num_objects: int, max_length: int | None, what: str,
                   objects: str, pad: str = IMAGE_PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize `full_text` once with offsets; token t gets the object its non-space characters mostly belong to
    (`char_object`, -1 = none; ties: lower k). Then check the control tokens against `template`, the number of
    image placeholders, that every object got a token, and the length."""
    encoding = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    token_objects = []
    for start, end in encoding["offset_mapping"]:
        covered = char_object[start:end]
        covered = covered[covered >= 0]
        token_objects.append(int(np.bincount(covered).argmax()) if covered.size else -1)  # ties: lower k
    input_ids = torch.tensor(encoding["input_ids"], dtype=torch.long)  # (L,)
    mask_ids = torch.tensor(token_objects, dtype=torch.long)  # (L,)

    _check_control_tokens(tokenizer, input_ids, encoding["offset_mapping"], full_text, template=template)
    pad_id = tokenizer.convert_tokens_to_ids(pad)
    num_pads = int((input_ids == pad_id).sum())
    if num_pads != num_images:
        raise InputError(f"{what}: expected exactly {'one' if num_images == 1 else num_images} {pad} "
                         f"token{'s' if num_images != 1 else ''}, found {num_pads}")
    missing = sorted(set(range(num_objects)) - set(mask_ids.tolist()))
    if missing:
        raise InputError(f"{what}: objects {missing} got no token (their text merged into a neighbour's "
                         f"tokens); {objects}")
    if max_length is not None and input_ids.numel() > max_length:
        raise InputError(f"{what}: the sequence has {input_ids.numel()} tokens (one compact placeholder per "
                         f"image) but max_length is {max_length}; shorten the text or raise model.max_length "
                         f"(e.g. model.max_length={2 ** max(11, (input_ids.numel() - 1).bit_length())}; nothing "
                         f"is truncated)")
    return input_ids, mask_ids


def _check_parts(parts: list[tuple[str, int]]) -> int:
    """Validate parts; return the number of objects K."""
    objects = set()
    for index, part in enumerate(parts):
        if not (isinstance(part, (tuple, list)) and len(part) == 2 and isinstance(part[0], str)
                and isinstance(part[1], (int, np.integer)) and not isinstance(part[1], bool) and part[1] >= -1):
            raise InputError(f"parts: part {index} must be (text: str, k: int >= -1), found {part!r}")
        text, k = part
        if k >= 0:
            if not text.strip():
                raise InputError(f"parts: part {index} (object {k}) has no text ({text!r})")
            objects.add(int(k))
    if objects != set(range(len(objects))) or not objects:
        raise InputError(f"parts: object indices must be exactly 0..K-1 with K >= 1, found {sorted(objects)}")
    return len(objects)


def control_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's added (control) tokens, e.g. `<|im_end|>`, `<|image_pad|>`, in id order."""
    return [added.content for _, added in sorted(tokenizer.added_tokens_decoder.items())]


def reject_control_tokens(tokenizer: PreTrainedTokenizerBase, text: str, *, what: str) -> None:
    """Raise InputError naming `what` if `text` contains a control token of `tokenizer`: it would be encoded as the
    chat template's structure (an end of turn, an image slot), not as words. The one check of user text (prompts,
    phrases, questions, answers; the CLI, the predictor and the web demo).

    Args:
        tokenizer: the model's tokenizer.
        text: user text.
        what: how the message names the text (e.g. "--question", "Line 2", "instruction").
    """
    for special in control_tokens(tokenizer):
        if special in text:
            raise InputError(f"{what} contains the special token {special!r}, a control token of the model's chat "
                             f"template, which user text must not contain: {text!r}")


def _check_control_tokens(tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor,
                          offsets: list[tuple[int, int]], full_text: str, *, system: str | None = None,
                          template: str | None = None) -> None:
    """Raise unless the added (control) tokens of `input_ids` are exactly the chat template's own, in order.

    The string checks above name the offending text; this one guards what the model reads, whatever way the text
    was put together.
    """
    added_ids = set(tokenizer.added_tokens_decoder)
    if template is None:  # the grounding prompt of training (`chat_prefix`) with an answer
        template = chat_prefix(instruction="", system="" if system is not None else None) + "<|im_end|>\n"
    expected = [i for i in tokenizer(template, add_special_tokens=False)["input_ids"] if i in added_ids]
    found = [(i, position) for position, i in enumerate(input_ids.tolist()) if i in added_ids]
    if [i for i, _ in found] == expected:
        return
    template_positions = _template_control_positions([i for i, _ in found], expected)
    extra = next(position for n, (_, position) in enumerate(found) if n not in template_positions)
    start, end = offsets[extra]
    raise InputError(f"the prompt text forms the control token {full_text[start:end]!r} at characters {start}-{end} "
                     f"(...{full_text[max(0, start - 30):end + 10]!r}...); user text must not contain or spell one")


def _template_control_positions(found: list[int], expected: list[int]) -> set[int]:
    """Indices into `found` matched greedily, in order, by the template's control tokens."""
    matched, cursor = set(), 0
    for index, token in enumerate(found):
        if cursor < len(expected) and token == expected[cursor]:
            matched.add(index)
            cursor += 1
    return matched


# ---------------------------------------------------------------------------- conversations (chat, generation)


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation rendered by the Qwen-VL chat template up to the assistant's answer of its last user turn.

    Attributes:
        text: the chat text, one compact `<|image_pad|>` block per image, ending with the assistant header.
        template: `text` with every user-given text emptied (what the control tokens must be, in order).
        num_images: image placeholders in `text`. num_clips: video placeholders in `text`.
        answer_prefix: text the assistant's answer is forced to start with ("" for none), e.g. "It is".
    """

    text: str
    template: str
    num_images: int
    answer_prefix: str = ""
    num_clips: int = 0


def build_chat_prompt(
    tokenizer: PreTrainedTokenizerBase,
    turns: Sequence[Sequence[Any]],
    *,
    answers: Sequence[str] = (),
    system: str | None = DEFAULT_SYSTEM,
    answer_prefix: str = "",
    image_block: str = IMAGE_BLOCK,
) -> ChatPrompt:
    """What the chat template renders for a conversation whose last user turn awaits the assistant's answer.

    Each user turn is a content list in order: a `str` is text, a `data.clips.ClipFrames` is one clip (one compact
    `VIDEO_BLOCK`), anything else (a PIL image, None) is one image (its block `image_block`, with one compact
    placeholder). The template renders `<|im_start|>user\\n` + the
    content items concatenated + `<|im_end|>\\n`, and earlier answers as
    `<|im_start|>assistant\\n{answer}<|im_end|>\\n`.

    Args:
        tokenizer: the Qwen tokenizer (for the list of its special tokens).
        turns: the user turns' contents, the current (unanswered) one last.
        answers: the assistant's answers to all turns but the last (`len(turns) - 1` of them).
        system: the system prompt; None = no system turn (Qwen3-VL's template default).
        answer_prefix: text the answer is forced to begin with (appended after the assistant header).
        image_block: the backbone's image block.

    Raises:
        InputError (a ValueError): no turn, a wrong number of answers, an empty text content, or user text holding a
            special token (named: "question", "turn 1 text 2", "answer 1", "system prompt", "answer prefix").
    """
    if not turns:
        raise InputError("chat: expected at least one user turn")
    if len(answers) != len(turns) - 1:
        raise InputError(f"chat: expected {len(turns) - 1} earlier answers for {len(turns)} user turns, found "
                         f"{len(answers)}")
    checks = [] if system is None else [(system, "system prompt")]
    text = template = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    if system is not None:
        template = "<|im_start|>system\n<|im_end|>\n"
    num_images = num_clips = 0
    for index, content in enumerate(turns):
        last = index == len(turns) - 1
        text += "<|im_start|>user\n"
        template += "<|im_start|>user\n"
        for position, item in enumerate(content):
            if isinstance(item, str):
                name = "question" if last and len(turns) == 1 else f"turn {index + 1} text {position + 1}"
                checks.append((item, name))
                text += item
            elif isinstance(item, ClipFrames):  # a clip: one compact video block
                text += VIDEO_BLOCK
                template += VIDEO_BLOCK
                num_clips += 1
            else:
                text += image_block
                template += image_block
                num_images += 1
        text += "<|im_end|>\n<|im_start|>assistant\n"
        template += "<|im_end|>\n<|im_start|>assistant\n"
        if not last:
            checks.append((answers[index], f"answer {index + 1}"))
            text += answers[index] + "<|im_end|>\n"
            template += "<|im_end|>\n"
    checks.append((answer_prefix, "answer prefix"))
    for value, name in checks:
        if not isinstance(value, str):
            raise InputError(f"chat: the {name} must be a str, found {type(value).__name__}")
        reject_control_tokens(tokenizer, value, what=name)
    return ChatPrompt(text=text, template=template, num_images=num_images, answer_prefix=answer_prefix,
                      num_clips=num_clips)


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    prompt: ChatPrompt,
    *,
    answer: str | None = None,
    spans: Sequence[tuple[int, int]] = (),
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize a conversation: the generation prompt, or the prompt + a grounded answer with its objects marked.

    Without `answer`: `prompt.text + prompt.answer_prefix`, the input of generation (mask_ids all -1). With it: the
    teacher-forced sequence `prompt.text + answer + "<|im_end|>\\n"` (the answer includes the prefix), tokenized
    once with offsets; token t gets `mask_ids[t] = k` when it covers non-space characters of `answer[spans[k]]`
    (as `encode_grounded` marks the parts of training data: the same subword boundaries).

    Args:
        tokenizer: the Qwen tokenizer (fast, for offsets).
        prompt: from `build_chat_prompt`.
        answer: the assistant's answer text (starting with `prompt.answer_prefix`), or None.
        spans: K (start, end) character spans into `answer`, non-overlapping, each with non-space text.
        max_length: if given, the longest allowed sequence (compact placeholders).

    Returns:
        input_ids: (L,) long with one `<|image_pad|>` per image. mask_ids: (L,) long in [-1, K-1].

    Raises:
        InputError (a ValueError): a special token in the answer, a bad span, an object without a token, a
            sequence longer than `max_length`.
    """
    if answer is None:
        if spans:
            raise InputError("encode_chat: spans need an answer")
        full_text, template = prompt.text + prompt.answer_prefix, prompt.template
    else:
        reject_control_tokens(tokenizer, answer, what="the answer")
        full_text, template = prompt.text + answer + "<|im_end|>\n", prompt.template + "<|im_end|>\n"
    char_object = np.full(len(full_text), -1, dtype=np.int64)  # (num_chars,)
    offset = len(prompt.text)
    previous_end = 0
    for k, (start, end) in enumerate(spans):
        if not (isinstance(start, int) and isinstance(end, int) and previous_end <= start < end <= len(answer)):
            raise InputError(f"encode_chat: span {k} ({start}, {end}) must lie in the answer (0..{len(answer)}), "
                             f"after span {k - 1}, and not be empty")
        is_visible = np.array([not char.isspace() for char in answer[start:end]], dtype=bool)
        if not is_visible.any():
            raise InputError(f"encode_chat: span {k} ({start}, {end}) holds only whitespace: {answer[start:end]!r}")
        char_object[offset + start:offset + end][is_visible] = k
        previous_end = end
    return _encode_marked(tokenizer, full_text, char_object, template=template, num_images=prompt.num_images,
                          num_objects=len(spans), max_length=max_length, what="encode_chat",
                          objects=f"spans: {[answer[s:e] for s, e in spans] if answer else []}")
