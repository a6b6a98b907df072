"""Why nvJPEG decoding does not overlap the encoder, on one GPU: the decode's host time with the GPU
idle and with an encoder batch queued ahead of it; the CUDA runtime calls it makes (torch.profiler);
decoding in a second thread beside an encoding thread; and nvImageCodec's decoder in the same places.

    HF_HUB_OFFLINE=1 python docs/measurements/2026-11-25-h100-overlap/overlap.py
"""

from __future__ import annotations

import statistics
import threading
import time

import open_clip
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from clip_fabric.benchmark import synthetic_photo

BATCH = 1024


def ms(fn, reps: int = 5, queued=None) -> float:
    """Median host milliseconds of ``fn``, after ``queued`` (if any) was put on the GPU just before."""
    times = []
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        if queued is not None:
            queued()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
        torch.cuda.synchronize()
    return statistics.median(times[1:])


def main() -> None:
    device = torch.device("cuda")
    model = open_clip.create_model("ViT-B-32").to(device, torch.bfloat16).eval()
    pixels = torch.randn(BATCH, 3, 224, 224, device=device, dtype=torch.bfloat16)
    raw = [synthetic_photo(i, (500, 375)) for i in range(BATCH)]
    blobs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raw]
    pool = torch.cuda.Stream()

    def tv() -> list:
        with torch.cuda.stream(pool):
            return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)

    def encode() -> None:
        model.encode_image(pixels)

    with torch.inference_mode():
        print(f"encode alone: {ms(lambda: (encode(), torch.cuda.synchronize())):.1f} ms per {BATCH}")
        print(f"torchvision decode, GPU idle:          {ms(tv):.1f} ms")
        print(f"torchvision decode, encode queued:     {ms(tv, queued=encode):.1f} ms")
        serial = ms(tv) + ms(lambda: (encode(), torch.cuda.synchronize()))
        print(f"torchvision decode+encode serial sum ~ {serial:.1f} ms")

        from torch.profiler import ProfilerActivity, profile

        encode(), tv()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                encode()
                tv()
            torch.cuda.synchronize()
        table = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40
        )
        print(table[:6000])

        def threads(decode_fn, seconds: float = 4.0) -> tuple[float, float]:
            """Images/s of a decoding thread and an encoding thread running at once."""
            done = {"decode": 0, "encode": 0}
            stop = time.perf_counter() + seconds

            def decoding() -> None:
                with torch.inference_mode():
                    while time.perf_counter() < stop:
                        decode_fn()
                        done["decode"] += BATCH

            worker = threading.Thread(target=decoding)
            worker.start()
            while time.perf_counter() < stop:
                encode()
                torch.cuda.current_stream().synchronize()
                done["encode"] += BATCH
            worker.join()
            return done["decode"] / seconds, done["encode"] / seconds

        d, e = threads(tv)
        print(f"threads, torchvision decode + encode at once: decode {d:,.0f} img/s, encode {e:,.0f} img/s")

        try:
            from nvidia import nvimgcodec
        except ImportError as err:
            print(f"nvImageCodec: not importable ({err})")
            return
        try:
            kinds = nvimgcodec.BackendKind
            nv = nvimgcodec.Decoder(
                device_id=0,
                backends=[nvimgcodec.Backend(kinds.HW_GPU_ONLY), nvimgcodec.Backend(kinds.GPU_ONLY)],
            )
            side = torch.cuda.Stream()

            def nvi() -> list:
                with torch.cuda.stream(side):
                    images = nv.decode(raw, cuda_stream=side.cuda_stream)
                    return [torch.as_tensor(image, device=device) for image in images]

            first = nvi()
            torch.cuda.synchronize()
            ref = tv()
            same = sum(torch.equal(a.permute(2, 0, 1), b) for a, b in zip(first, ref, strict=True))
            diff = max(
                (a.permute(2, 0, 1).int() - b.int()).abs().max().item()
                for a, b in zip(first, ref, strict=True)
            )
            shape = tuple(first[0].shape)
            print(f"nvImageCodec {nvimgcodec.__version__}: shape {shape}, identical to torchvision ", end="")
            print(f"for {same}/{BATCH} images, max |diff| {diff}")
            print(f"nvImageCodec decode (host ms), GPU idle:      {ms(nvi):.1f} ms")
            print(f"nvImageCodec decode (host ms), encode queued: {ms(nvi, queued=encode):.1f} ms")

            def waited() -> None:
                nvi()
                side.synchronize()

            print(f"nvImageCodec decode incl. wait, GPU idle:     {ms(waited):.1f} ms")
            print(f"nvImageCodec decode incl. wait, encode queued:{ms(waited, queued=encode):.1f} ms")
            d, e = threads(lambda: (nvi(), side.synchronize()))
            print(
                f"threads, nvImageCodec decode + encode at once: decode {d:,.0f} img/s, encode {e:,.0f} img/s"
            )
        except Exception as err:  # noqa: BLE001 - report and go on: a probe
            print(f"nvImageCodec failed: {type(err).__name__}: {err}")


if __name__ == "__main__":
    main()
