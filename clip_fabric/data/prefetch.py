"""The hop from host to device, a few batches ahead of the encoder.

On a GPU a background thread takes the next batches from the DataLoader (pinned by it), copies them
with non-blocking copies and runs the device stage (GPU JPEG decoding) on a side CUDA stream, so that
copying and decoding batch k+1 overlap encoding batch k. The encoder's stream waits on each batch's
event before using it. On the CPU the same steps run in line, unless ``background`` asks otherwise.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext

import torch

_END = object()
_TENSORS = ("images", "texts")


class DevicePrefetcher:
    def __init__(
        self,
        batches: Iterable[dict],
        device: torch.device,
        stage: Callable[[dict], dict] | None = None,
        depth: int = 2,
        background: bool | None = None,
    ) -> None:
        self.batches = batches
        self.device = torch.device(device)
        self.stage = stage
        self.depth = depth
        self.background = self.device.type == "cuda" if background is None else background

    def __iter__(self) -> Iterator[dict]:
        if not self.background:
            for batch in self.batches:
                yield self._to_device(batch)
            return
        yield from self._threaded()

    def _to_device(self, batch: dict) -> dict:
        if self.stage is not None:
            batch = self.stage(batch)
        for key in _TENSORS:
            if batch.get(key) is not None:
                batch[key] = batch[key].to(self.device, non_blocking=True)
        return batch

    def _threaded(self) -> Iterator[dict]:
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        batches = iter(self.batches)  # DataLoader workers are forked here, from the main thread

        def put(item: object) -> None:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def work() -> None:
            side = torch.cuda.Stream(self.device) if cuda else None
            try:
                with torch.inference_mode(), torch.cuda.stream(side) if cuda else nullcontext():
                    for batch in batches:
                        if stop.is_set():
                            return
                        batch = self._to_device(batch)
                        event = None
                        if cuda:
                            event = torch.cuda.Event()
                            event.record(side)
                        put((batch, event))
                put((_END, None))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
                put((err, None))

        thread = threading.Thread(target=work, name="clip_fabric-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item, event = ready.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for key in _TENSORS:  # made on the side stream, used on this one
                        if isinstance(item.get(key), torch.Tensor) and item[key].device.type == "cuda":
                            item[key].record_stream(current)
                yield item
        finally:
            stop.set()
            thread.join(timeout=30)
