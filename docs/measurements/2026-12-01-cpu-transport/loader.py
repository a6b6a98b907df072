"""The ``cpu`` decode path's data loader, as predict builds it, with batches of uint8 pixels (now, for
a GPU) and of float32 model input (as before 2026-12-01, and still for a CPU run), alternated in one
process so that both see the same machine. Prints images/s of each round and the medians.

    python docs/measurements/2026-12-01-cpu-transport/loader.py [--workers 2] [--rounds 5] [--size 500x375]

Each round reads SHARDS shards of 256 JPEGs of ``--size`` (the benchmark's photo-like pictures) with
ViT-B-32's preprocess through a DataLoader of ``--workers`` workers, in batches of 256. The third
variant adds the normalisation that a GPU now does (in microseconds) to the main process on the CPU:
what a run with --accelerator cpu would pay, which is why a CPU run keeps it in the workers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import open_clip
import torch
from torch.utils.data import DataLoader

from clip_fabric.benchmark.shards import synthetic_photo
from clip_fabric.data import RawSample, Shard
from clip_fabric.data.decode import CpuDecoder
from clip_fabric.data.stream import ShardStream

SHARDS, PER_SHARD = 8, 256


class Source:
    def __init__(self, blobs: list[bytes]) -> None:
        self.blobs = blobs

    def samples(self, shard: Shard):
        for i, blob in enumerate(self.blobs):
            yield RawSample(f"{shard.index}-{i}", blob, "a caption")


def rate(decoder: CpuDecoder, blobs: list[bytes], workers: int, normalise: bool) -> float:
    shards = [Shard(i, f"s{i}") for i in range(SHARDS)]
    loader = DataLoader(ShardStream(Source(blobs), shards, decoder, 256, True, False), batch_size=None,
                        num_workers=workers)  # fmt: skip
    images, start = 0, None
    for batch in loader:
        if start is None:  # from the first batch on: worker start-up is not transport
            start = time.perf_counter()
            continue
        if batch.images is not None:
            if normalise:
                batch = batch.to(torch.device("cpu"), decoder.spec.normalise)
            images += len(batch.rows)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the JPEGs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    width, height = (int(v) for v in args.size.split("x"))
    blobs = [synthetic_photo(i, (width, height)) for i in range(PER_SHARD)]
    pixels = CpuDecoder(preprocess, None, mode="cpu", normalise_on_device=True)
    variants = {
        "float32 (before)": (CpuDecoder(preprocess, None, mode="cpu"), False),
        "uint8 (now, for a GPU)": (pixels, False),
        "uint8 + normalise in the main process": (pixels, True),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, (decoder, normalise) in variants.items():
            rates[name].append(rate(decoder, blobs, args.workers, normalise))
        print(f"round {round_}: " + ", ".join(f"{n} {r[-1]:.0f}" for n, r in rates.items()), flush=True)
    summary = {}
    for name, r in rates.items():
        # Paired by round: each ratio compares runs made one after the other.
        ratios = [x / b for x, b in zip(r, rates["float32 (before)"], strict=True)]
        summary[name] = {
            "median_images_per_s": round(statistics.median(r), 1),
            "median_ratio_to_before": round(statistics.median(ratios), 3),
        }
    kb = sum(map(len, blobs)) / len(blobs) / 1000
    head = {"size": args.size, "jpeg_kb": round(kb, 1), "workers": args.workers, "rounds": args.rounds}
    print(json.dumps(head | summary, indent=1))


if __name__ == "__main__":
    main()
