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
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from flmm_model.config import DEFAULT_INSTRUCTION
from flmm_model.errors import InputError

DEFAULT_SYSTEM = "You are a helpful assistant."  # Qwen2-VL's and Qwen2.5-VL's chat-template default

IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"

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


def chat_prefix(*, instruction: str = DEFAULT_INSTRUCTION, system: str | None = DEFAULT_SYSTEM) -> str:
    """The Qwen-VL chat text up to the assistant's answer, with one compact image placeholder (what the chat template
    renders for one user turn holding the image and then the instruction). `system=None`: no system turn (Qwen3-VL's
    template default)."""
    system_turn = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return (f"{system_turn}<|im_start|>user\n{IMAGE_BLOCK}{instruction}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def encode_grounded(
    tokenizer: PreTrainedTokenizerBase,
    parts: list[tuple[str, int]],
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    system: str | None = DEFAULT_SYSTEM,
    max_length: int | None = None,
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

    Returns:
        input_ids: (L,) long, with exactly one `<|image_pad|>` (the model expands it to the image's tokens).
        mask_ids: (L,) long in [-1, K-1]; every object has at least one token.

    Raises:
        InputError (a ValueError): bad parts, a special token (e.g. "<|image_pad|>") inside user text or formed by
            joining parts, an object that gets no token, or a sequence longer than `max_length` (nothing is ever
            truncated).
    """
    num_objects = _check_parts(parts)
    special_texts = [added.content for added in tokenizer.added_tokens_decoder.values()]
    if system is not None:
        _reject_special_tokens(special_texts, system, "system prompt")
    _reject_special_tokens(special_texts, instruction, "instruction")
    for index, (text, k) in enumerate(parts):
        _reject_special_tokens(special_texts, text, f"part {index} (object {k})")
    prefix = chat_prefix(instruction=instruction, system=system)
    answer = "".join(text for text, _ in parts)
    _reject_special_tokens(special_texts, answer, "the answer joined from its parts")
    full_text = prefix + answer + "<|im_end|>\n"

    # Object index per character: only non-space characters of object parts count.
    char_object = np.full(len(full_text), -1, dtype=np.int64)  # (num_chars,)
    cursor = len(prefix)
    for text, k in parts:
        if k >= 0:
            is_visible = np.array([not char.isspace() for char in text], dtype=bool)
            char_object[cursor:cursor + len(text)][is_visible] = k
        cursor += len(text)

    encoding = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    token_objects = []
    for start, end in encoding["offset_mapping"]:
        covered = char_object[start:end]
        covered = covered[covered >= 0]
        token_objects.append(int(np.bincount(covered).argmax()) if covered.size else -1)  # ties: lower k
    input_ids = torch.tensor(encoding["input_ids"], dtype=torch.long)  # (L,)
    mask_ids = torch.tensor(token_objects, dtype=torch.long)  # (L,)

    _check_control_tokens(tokenizer, input_ids, encoding["offset_mapping"], full_text, system=system)
    image_pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    num_pads = int((input_ids == image_pad_id).sum())
    if num_pads != 1:
        raise InputError(f"encode_grounded: expected exactly one {IMAGE_PAD} token, found {num_pads}")
    missing = sorted(set(range(num_objects)) - set(mask_ids.tolist()))
    if missing:
        raise InputError(f"encode_grounded: objects {missing} got no token (their text merged into a neighbour's "
                         f"tokens); parts: {parts}")
    if max_length is not None and input_ids.numel() > max_length:
        raise InputError(f"encode_grounded: the sequence has {input_ids.numel()} tokens (one compact image "
                         f"placeholder) but max_length is {max_length}; shorten the text or raise model.max_length "
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


def _reject_special_tokens(special_texts: list[str], text: str, name: str) -> None:
    """Raise if `text` contains an added token (it would be encoded as a control token, e.g. an image slot)."""
    for special in special_texts:
        if special in text:
            raise InputError(f"{name} contains the special token {special!r}, which user text must not "
                             f"contain: {text!r}")


def _check_control_tokens(tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor,
                          offsets: list[tuple[int, int]], full_text: str, *, system: str | None) -> None:
    """Raise unless the added (control) tokens of `input_ids` are exactly the chat template's own, in order.

    The string checks above name the offending text; this one guards what the model reads, whatever way the text
    was put together.
    """
    added_ids = set(tokenizer.added_tokens_decoder)
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
