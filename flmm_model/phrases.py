"""Which parts of a generated answer to ground: phrases, character spans, or spaCy's noun phrases.

`resolve_spans(answer, ground)` turns what a caller of `FrozenQwenSAM.chat(..., ground=...)` asks for into
non-overlapping character spans into the answer, in answer order:
- None: nothing (no mask);
- a list of phrases: each must occur in the answer, searched from the end of the previous one (so repeated words
  are taken in order); a phrase not found raises ValueError naming it and showing the answer;
- a list of `(start, end)` spans: checked (inside the answer, not empty, not overlapping), sorted;
- "noun_phrases": every noun chunk spaCy finds (`doc.noun_chunks`), filtered as F-LMM's grounded-conversation demo
  filters them: chunks mentioning the image itself ("image" in the text) and pronouns / wh-words ("it", "this",
  "them", "which", ...) are dropped, a chunk whose text repeats an earlier one or lies inside a longer chunk is
  dropped, and overlapping chunks keep the first;
- a callable `answer -> spans`: spans chosen once the answer is known (e.g. the web demo's typed phrases that occur
  in it), checked as a list of spans is.

spaCy is an optional dependency (the `[nlp]` extra) with an English pipeline installed separately; without them
"noun_phrases" raises a MissingDependencyError (an ImportError) that says what to install. The pipeline is loaded
once per name.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from flmm_model.errors import InputError, MissingDependencyError

NOUN_PHRASES = "noun_phrases"
DEFAULT_SPACY_MODEL = "en_core_web_sm"  # F-LMM's pipeline
# F-LMM's demo drops chunks whose lower-cased text is one of these (pronouns, wh-words, a lone article).
SKIPPED_CHUNKS = frozenset({"it", "this", "that", "those", "these", "them", "he", "she", "you", "i", "they", "me",
                            "her", "him", "a", "what", "which", "whose", "who"})

Span = tuple[int, int]


def resolve_spans(answer: str, ground: Any, *, spacy_model: str = DEFAULT_SPACY_MODEL) -> list[Span]:
    """Character spans of `answer` to ground, in answer order (see the module docstring for the forms of `ground`).

    Raises:
        ValueError (InputError): a phrase not in the answer, a bad span, a `ground` of an unknown form.
        MissingDependencyError (an ImportError): "noun_phrases" without spaCy or its English pipeline (the message
            says what to install).
    """
    if ground is None:
        return []
    if callable(ground):
        return check_spans(answer, list(ground(answer)))
    if isinstance(ground, str):
        if ground != NOUN_PHRASES:
            raise InputError(f"ground: expected None, {NOUN_PHRASES!r}, a list of phrases or a list of (start, end) "
                             f"spans, found the string {ground!r} (for one phrase, pass [{ground!r}])")
        return noun_phrase_spans(answer, spacy_model=spacy_model)
    items = list(ground)
    if all(isinstance(item, str) for item in items):
        return phrase_spans(answer, items)
    if all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
        return check_spans(answer, [(item[0], item[1]) for item in items])
    raise InputError(f"ground: expected None, {NOUN_PHRASES!r}, a list of phrases or a list of (start, end) spans, "
                     f"found {ground!r}")


def phrase_spans(answer: str, phrases: Sequence[str]) -> list[Span]:
    """Each phrase's first occurrence after the previous phrase's end, case-exact (`chat(ground=phrases)`)."""
    return search_phrases(answer, phrases, ignore_case=False, strict=True)[0]


def search_phrases(answer: str, phrases: Sequence[str], *, ignore_case: bool = False,
                   strict: bool = True) -> tuple[list[Span], list[str]]:
    """The one phrase search: (sorted spans of the found phrases, the phrases not found).

    Each phrase takes its first occurrence after the previous found phrase's end. `strict` (`chat(ground=phrases)`):
    a phrase that does not occur there, or an empty one, is an InputError naming it. Not strict (the web demo's
    typed phrases): a phrase that occurs only earlier takes its first occurrence overlapping no found phrase, and
    one that does not occur at all is returned as missing. `ignore_case`: "the cup" finds "The cup" (the span is the
    answer's own text), for phrases a person types without knowing how the answer capitalises them.
    """
    found: list[Span] = []
    missing: list[str] = []
    cursor = 0
    for k, phrase in enumerate(phrases):
        if strict and not phrase.strip():
            raise InputError(f"ground: phrase {k} is empty ({phrase!r})")
        starts = _occurrences(answer, phrase, cursor, ignore_case=ignore_case)
        if not strict:
            starts += _occurrences(answer, phrase, 0, ignore_case=ignore_case)
        start = next((s for s in starts if all(s + len(phrase) <= a or b <= s for a, b in found)), None)
        if start is None:
            if strict:
                where = "in the answer" if cursor == 0 else f"in the answer after phrase {k - 1} ({phrases[k - 1]!r})"
                raise InputError(f"ground: phrase {k} {phrase!r} does not occur {where}; the answer is {answer!r}")
            missing.append(phrase)
            continue
        found.append((start, start + len(phrase)))
        cursor = start + len(phrase)
    return sorted(found), missing


def _occurrences(text: str, phrase: str, start: int, *, ignore_case: bool) -> list[int]:
    """Every index at or after `start` where `phrase` occurs in `text` (overlapping occurrences included: a lookahead
    matches at each position). A case-folded copy of `text` could change its length (e.g. "ß"), so matching runs on
    the text itself."""
    pattern = re.compile(f"(?={re.escape(phrase)})", re.IGNORECASE if ignore_case else 0)
    return [match.start() for match in pattern.finditer(text, start)]


def check_spans(answer: str, spans: Sequence[Span]) -> list[Span]:
    """Spans sorted by start; each inside the answer, holding non-space text, none overlapping another."""
    for k, (start, end) in enumerate(spans):
        if not (isinstance(start, int) and isinstance(end, int) and not isinstance(start, bool)
                and 0 <= start < end <= len(answer)):
            raise InputError(f"ground: span {k} ({start!r}, {end!r}) must be integers with 0 <= start < end <= "
                             f"{len(answer)} (the answer's length); the answer is {answer!r}")
        if not answer[start:end].strip():
            raise InputError(f"ground: span {k} ({start}, {end}) holds only whitespace {answer[start:end]!r}")
    ordered = sorted((int(s), int(e)) for s, e in spans)
    for (_, end), (start, next_end) in zip(ordered, ordered[1:], strict=False):
        if start < end:
            raise InputError(f"ground: spans overlap: {answer[start:next_end]!r} starts inside the span before it")
    return ordered


def noun_phrase_spans(answer: str, *, spacy_model: str = DEFAULT_SPACY_MODEL) -> list[Span]:
    """spaCy noun chunks of `answer`, filtered as F-LMM's demo does (see the module docstring)."""
    nlp = load_spacy(spacy_model)
    chunks = [(chunk.start_char, chunk.end_char) for chunk in nlp(answer).noun_chunks]
    return filter_noun_chunks(answer, chunks)


def filter_noun_chunks(answer: str, chunks: Sequence[Span]) -> list[Span]:
    """F-LMM's filter over noun-chunk spans: drop image mentions, pronouns / wh-words, repeated texts and texts
    inside a longer chunk's text; overlapping survivors keep the first. In answer order."""
    texts = [answer[start:end] for start, end in chunks]
    kept: list[Span] = []
    for index, ((start, end), text) in enumerate(zip(chunks, texts, strict=True)):
        lower = text.lower()
        if "image" in lower or lower in SKIPPED_CHUNKS or not text.strip():
            continue
        if text in texts[:index]:  # the same text again: F-LMM grounds each distinct chunk once
            continue
        if any(text in other and len(other) > len(text) for other in texts):
            continue
        if kept and start < kept[-1][1]:
            continue
        kept.append((start, end))
    return kept


def spacy_missing_message(spacy_model: str) -> str | None:
    """None when spaCy and the pipeline can be loaded, else what to install."""
    if importlib.util.find_spec("spacy") is None:
        return (f'ground="noun_phrases" needs spaCy, an optional extra, and its English pipeline: pip install -e '
                f'".[nlp]" && python -m spacy download {spacy_model}')
    if importlib.util.find_spec(spacy_model) is None and not _is_path(spacy_model):
        return (f'ground="noun_phrases" needs the spaCy pipeline {spacy_model!r}: python -m spacy download '
                f'{spacy_model} (or pass spacy_model= the name or path of an installed English pipeline)')
    return None


def _is_path(name: str) -> bool:
    return os.path.isdir(name)


@lru_cache(maxsize=4)
def load_spacy(spacy_model: str = DEFAULT_SPACY_MODEL) -> Any:
    """The spaCy pipeline `spacy_model` (a package name or a directory), loaded once.

    Raises:
        MissingDependencyError (an ImportError): spaCy or the pipeline is missing; the message says what to install.
    """
    problem = spacy_missing_message(spacy_model)
    if problem:
        raise MissingDependencyError(problem)
    import spacy  # the optional extra: imported only when noun phrases are asked for

    return spacy.load(spacy_model)
