"""Bad data: one exception type, and the skip-and-count policy the datasets share.

A dataset built with `on_error="raise"` (the default) lets every `DataError` propagate: the message names the file
and the sample. With `on_error="skip"`, a sample that fails in `__getitem__` comes back as `None` (the `Collator`
drops it and counts it in the batch's `num_skipped`), and bad annotation records found while loading are left out
of the index. Every dataset keeps one `SkipLog` as `dataset.skips` and routes both through it: `skips.guard` wraps
`__getitem__`, `skips.handle` the records; `skips.count` counts them and `skips.report()` lists them.

Counts made inside DataLoader worker processes stay in those processes: in the main process, sum the batches'
`num_skipped` instead (`dataset.skips.count` is complete only with `num_workers=0`).

Data is validated, never trusted: a malformed record must never decode into a silently wrong sample, nor escape as
a bare TypeError from inside a library. `record_errors(where)` turns whatever reading one record raises into a
DataError naming the file, the sample and the record, so the policy above applies to it as to every other bad record.

`load_json` reads annotation files with the same kind of error; `expect_type` checks the shape of what it read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from flmm_model.errors import UserError

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("raise", "skip")
Item = TypeVar("Item")


class DataError(UserError, ValueError):
    """A dataset file or record that cannot give a correct sample; the message names the file and the sample."""


@contextlib.contextmanager
def record_errors(where: str) -> Iterator[None]:
    """Re-raise anything raised inside the block as a DataError prefixed with `where` (a DataError passes as is).

    Malformed data can break any step of reading a record (a KeyError, a TypeError from a library, an OverflowError
    from a C extension); the record is bad whatever the exception, so it is named and handled like every bad record.
    MemoryError and interrupts are not data errors and pass unchanged.
    """
    try:
        yield
    except DataError:
        raise
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure on this record means the record is malformed
        raise DataError(f"{where}: malformed record ({type(error).__name__}: {error})") from error


def expect_type(value: Any, kind: type | tuple[type, ...], *, where: str, what: str) -> Any:
    """`value` if it is an instance of `kind`, else DataError: "<where>: expected <what>, found <type>"."""
    if not isinstance(value, kind):
        raise DataError(f"{where}: expected {what}, found {type(value).__name__}")
    return value


def check_on_error(on_error: str) -> str:
    """Validate an `on_error` argument ("raise" or "skip") and return it."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error: expected one of {ON_ERROR_CHOICES}, found {on_error!r}")
    return on_error


class SkipLog:
    """Applies an `on_error` policy to `DataError`s and remembers what was skipped.

    Args:
        on_error: "raise" re-raises every error handed to `handle`; "skip" logs a warning, records it and returns.
        dataset: a name for the log lines, e.g. "refcoco/val".
    """

    def __init__(self, *, on_error: str, dataset: str) -> None:
        self.on_error = check_on_error(on_error)
        self.dataset = dataset
        self.reasons: list[str] = []

    def handle(self, error: DataError) -> None:
        """Raise `error` under "raise"; under "skip" record it and return None (the caller drops the sample)."""
        if self.on_error == "raise":
            raise error
        self.reasons.append(str(error))
        logger.warning("%s: skipped (%d so far): %s", self.dataset, len(self.reasons), error)

    def guard(self, build: Callable[[int], Item], index: int) -> Item | None:
        """`build(index)`, or None when it raises DataError and the policy is "skip" (the one skip guard)."""
        try:
            return build(index)
        except DataError as error:
            self.handle(error)
            return None

    @property
    def count(self) -> int:
        return len(self.reasons)

    def report(self) -> str:
        """One line per skipped sample or record, after a summary line."""
        lines = [f"{self.dataset}: {self.count} skipped"] + [f"  {reason}" for reason in self.reasons]
        return "\n".join(lines)


def index_records(container: dict, section: str, key: str, *, path: str, skips: SkipLog) -> dict[Any, dict]:
    """The records of `container[section]` (a list of dicts, e.g. COCO's "images") by their `key` field.

    The section must be a list (DataError otherwise); a record that is not a dict or lacks `key` is bad data, handed
    to `skips` (raised, or skipped and counted). So are records sharing one `key` value: which of them is meant
    cannot be told, so under "skip" all of them are left out (each counted), and whatever refers to that id finds
    none.
    """
    records = expect_type(container.get(section, []), list, where=f"{path}: {section!r}", what="a list of records")
    indexed: dict[Any, dict] = {}
    positions: dict[Any, list[int]] = {}
    for position, record in enumerate(records):
        if isinstance(record, dict) and key in record:
            try:
                positions.setdefault(record[key], []).append(position)
            except TypeError:  # an unhashable id (a list, a dict)
                skips.handle(DataError(f"{path}: {section} record {position}: its {key!r} is a "
                                       f"{type(record[key]).__name__} ({str(record[key])[:80]}), not an id"))
                continue
            indexed.setdefault(record[key], record)
        else:
            skips.handle(DataError(f"{path}: {section} record {position} has no {key!r} (found "
                                   f"{type(record).__name__} {str(record)[:80]})"))
    for value, found in positions.items():
        if len(found) > 1:
            del indexed[value]
            for position in found:
                skips.handle(DataError(f"{path}: {section} record {position}: {key} {value!r} is shared by "
                                       f"{len(found)} records (positions {found}); ids must be unique"))
    return indexed


def load_json(path: str) -> Any:
    """Read a JSON annotation file; a missing or malformed file raises DataError naming it."""
    if not os.path.isfile(path):
        raise DataError(f"missing annotation file {path}")
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"cannot read annotation file {path}: {error}") from error
