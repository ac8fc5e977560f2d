"""The web demo over a sharded LMM (`torchrun ... run.py demo` with `model.shard_lmm=fsdp`): the main process serves
the page, and every model call it makes is first sent to the other processes, which make the same call on their
shards, so every forward's all-gathers pair up. No Gradio here.

`LockstepModel` wraps the main process's model: `segment`, `chat` and `segment_clip` broadcast (name, arguments)
before running; everything else (tokenizer, max_length, ...) is the model's. `follow_calls` is the other processes'
loop: it runs each broadcast call until the main process sends the stop (`LockstepModel.stop`). A call that fails on
bad input fails alike everywhere (the same checks on the same input), and the followers go on to the next one.

The calls travel on their own gloo group with a long timeout: a demo waits for requests for hours, longer than a
GPU backend's collective timeout would let a follower wait.
"""

from __future__ import annotations

import datetime
import logging
import signal
from typing import Any

import torch.distributed as dist

logger = logging.getLogger(__name__)

CALLS = ("segment", "chat", "segment_clip")  # what the demo's session asks of the model
WAIT = datetime.timedelta(days=30)  # how long a follower may wait for the next request


def call_group() -> Any:
    """A gloo process group over all processes for the calls (every process must create it, in the same order)."""
    return dist.new_group(backend="gloo", timeout=WAIT)


class LockstepModel:
    """The main process's model, sending each `segment` / `chat` / `segment_clip` call to the followers before
    making it."""

    def __init__(self, model: Any, *, group: Any) -> None:
        self.model, self.group = model, group

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def segment(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("segment", args, kwargs)

    def chat(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("chat", args, kwargs)

    def segment_clip(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("segment_clip", args, kwargs)

    def _call(self, name: str, args: tuple, kwargs: dict) -> Any:
        dist.broadcast_object_list([(name, args, kwargs)], src=0, group=self.group)
        return getattr(self.model, name)(*args, **kwargs)

    def stop(self) -> None:
        """Let the followers return (the server has stopped)."""
        dist.broadcast_object_list([None], src=0, group=self.group)


def follow_calls(model: Any, *, group: Any) -> int:
    """On a process other than the main one: make every call the main process broadcasts, on `model`, until it
    stops; returns the number of calls made.

    Ctrl-C and SIGTERM (torchrun forwards both to every process) are ignored here: the main process stops its
    server and then sends the stop, so a follower ends after it, not in the middle of a call.
    """
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _follow(model, group=group)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _follow(model: Any, *, group: Any) -> int:
    calls = 0
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        if box[0] is None:
            return calls
        name, args, kwargs = box[0]
        if name not in CALLS:
            raise RuntimeError(f"demo follower: unknown call {name!r} (expected one of {CALLS})")
        try:
            getattr(model, name)(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - bad input fails on the main process too, which reports it
            logger.info("demo follower: %s failed as on the main process: %s", name, error)
        calls += 1
