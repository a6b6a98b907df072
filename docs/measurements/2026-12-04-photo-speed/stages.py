"""Stage timings of the GPU data path on photo-like and uniform JPEGs, and its closeness to open_clip.

    python docs/measurements/2026-12-04-photo-speed/stages.py OUT.json [--images 2048] [--batch 512]

Each stage alone on resident data (the JPEG bytes packed in pinned memory as the workers hand them
over), timed with a device synchronisation after each pass over all batches, best of three passes:
decode alone per library, ``prepare`` (decode, cut to the crop's window, pack) and ``finish`` (batched
resize, normalise) alone, the whole device stage in line (``DeviceImageDecoder``), the ViT-B-32 tower
alone (bf16-true) and the stage and the tower together as predict runs them (``prepare`` in a thread of
its own, ``encode_in_order``). Closeness: model input
of the stage against open_clip's own preprocess, per image (cosine of the pixel tensors), and fp32
ViT-B-32 image embeddings of the same (cosine).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import open_clip
import torch

from clip_fabric.benchmark.shards import PHOTO, image_size, synthetic_photo
from clip_fabric.data import RawSample, Shard
from clip_fabric.data.decode import CpuDecoder
from clip_fabric.data.device_decode import DeviceImageDecoder
from clip_fabric.data.stream import ShardStream
from clip_fabric.encode import encode_in_order


class Prefetch:
    """``prepare`` run on each of ``batches`` in a thread of its own, at most one ahead of the consumer
    (measured only, not in the package: 5,487 photo images/s with the tower, run4.sh); an error in
    the thread is raised in the consumer, and leaving the ``with`` stops the thread (a daemon)."""

    def __init__(self, batches: Iterator, prepare: Callable) -> None:
        self.queue: queue.Queue = queue.Queue(1)
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(batches, prepare), name="clip_fabric-decode", daemon=True
        )

    def __enter__(self) -> Iterator:
        self.thread.start()
        return self._items()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def _run(self, batches: Iterator, prepare: Callable) -> None:
        try:
            for batch in batches:
                if not self._put(prepare(batch)):
                    return
            self._put(_END)
        except BaseException as err:  # noqa: BLE001 - raised again in the consumer
            self._put(_Failed(err))

    def _put(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _items(self) -> Iterator:
        while True:
            try:
                item = self.queue.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the decode thread ended without a word") from None
                continue
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item


_END = object()


@dataclass
class _Failed:
    error: BaseException


def _jpeg(task: tuple[int, tuple[int, int]]) -> bytes:
    index, size = task
    return synthetic_photo(index, image_size(index, size))


class Listed:
    def __init__(self, samples: list[RawSample]) -> None:
        self.items = samples

    def samples(self, shard: Shard):
        yield from self.items[shard.start : shard.stop]


def packed_batches(jpegs: list[bytes], decoder: CpuDecoder, batch: int) -> list:
    samples = [RawSample(f"{i:06d}", data, "x") for i, data in enumerate(jpegs)]
    shards = [Shard(i, "s", i * batch, (i + 1) * batch) for i in range(len(jpegs) // batch)]
    stream = ShardStream(Listed(samples), shards, decoder, batch, True, False, gpu_jpeg=True)
    full = [b for b in stream if b.jpegs is not None]  # each shard also ends with an empty batch
    return [b.pin_memory() if torch.cuda.is_available() else b for b in full]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_of(fn, passes: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(passes):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_set(name: str, jpegs: list[bytes], batch: int, model, tower, device) -> dict:
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    decoder = CpuDecoder(preprocess, open_clip.get_tokenizer("ViT-B-32"), mode="pil")
    batches = packed_batches(jpegs, decoder, batch)
    n = sum(len(b.rows) for b in batches)
    row: dict = {"set": name, "images": n, "mean_jpeg_kb": round(sum(map(len, jpegs)) / len(jpegs) / 1e3, 1)}
    for library in ("nvimgcodec", "torchvision"):
        try:
            stage = DeviceImageDecoder(decoder.spec, decoder, device, library=library)
        except Exception as err:  # noqa: BLE001 - a library that is not there is a row of its own
            row[library] = {"error": f"{type(err).__name__}: {err}"}
            continue
        row[library] = time_library(stage, batches, tower, n) | closeness(
            stage, batches, jpegs, preprocess, model, device
        )
        print(name, library, row[library], flush=True)
    images = torch.randn(batch, 3, 224, 224, device=device)
    t_tower = best_of(lambda: [tower(images, None)["image"].sum().item() for _ in batches])
    row["tower_images_per_s"] = round(n / t_tower)
    return row


def time_library(stage: DeviceImageDecoder, batches: list, tower, n: int) -> dict:
    """images/s of the decode alone, prepare (decode + pack) alone, finish (resize, normalise) alone,
    the whole stage in line, and the stage with the tower as predict runs it (prepare in its thread)."""
    blobs = [[b.jpegs.data.numpy()[a:z] for a, z in _bounds(b)] for b in batches]
    steps: list = []

    def prepare_only() -> None:
        steps.clear()
        steps.extend(stage.prepare(b) for b in batches)

    def together() -> None:
        with Prefetch(iter(batches), stage.prepare) as prepared:
            finished = (stage.finish(step) for step in prepared)
            for _ in encode_in_order(finished, tower, lambda: False, set):
                pass

    return {
        "decode_images_per_s": round(n / best_of(lambda: [stage.jpegs(p, stage.side) for p in blobs])),
        "prepare_images_per_s": round(n / best_of(prepare_only)),
        "finish_images_per_s": round(n / best_of(lambda: [stage.finish(s) for s in steps])),
        "stage_images_per_s": round(n / best_of(lambda: [stage(b) for b in batches])),
        "stage_and_tower_images_per_s": round(n / best_of(together)),
    }


def _bounds(batch) -> list[tuple[int, int]]:
    ends = batch.jpegs.lengths.cumsum(0).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def closeness(stage, batches, jpegs, preprocess, model, device, count: int = 256) -> dict:
    """Per image, the stage's model input and fp32 embedding against open_clip's preprocess."""
    import io

    from PIL import Image

    out = stage(batches[0])
    mine = out.images[:count].float()
    ref = torch.stack([preprocess(Image.open(io.BytesIO(jpegs[i]))) for i in range(len(mine))]).to(device)
    pixel_cos = torch.nn.functional.cosine_similarity(mine.flatten(1), ref.flatten(1))
    with torch.inference_mode():
        a = torch.nn.functional.normalize(model.encode_image(mine).double(), dim=-1)
        b = torch.nn.functional.normalize(model.encode_image(ref).double(), dim=-1)
    emb_cos = (a * b).sum(-1)
    return {
        "pixel_cosine_min": float(pixel_cos.min()),
        "embedding_cosine_min_fp32": float(emb_cos.min()),
        "embedding_distance_max_fp32": float(1 - emb_cos.min()),
        "max_abs_diff_normalised": float((mine - ref).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32")
    model = model.to(device).eval()
    fast = (
        open_clip.create_model_and_transforms("ViT-B-32")[0]
        .to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        .eval()
    )

    def tower(images, texts):
        return {"image": fast.encode_image(images.to(next(fast.parameters()).dtype)).float()}

    rows = []
    with multiprocessing.Pool() as pool:
        for name, size in (("photo", PHOTO), ("500x375", (500, 375)), ("1024x768", (1024, 768))):
            jpegs = pool.map(_jpeg, [(i, size) for i in range(args.images)])
            with torch.inference_mode():
                rows.append(measure_set(name, jpegs, args.batch, model, tower, device))
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
