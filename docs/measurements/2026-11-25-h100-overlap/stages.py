"""The GPU image path's stages timed alone and together on one GPU, from JPEG bytes already in pinned
memory (no DataLoader): what bounds `--data.decode gpu` end to end, and whether decoding the next batch
while the encoder runs the current one changes any embedding (the stream race of 2026-11-25).

    HF_HUB_OFFLINE=1 python docs/measurements/2026-11-25-h100-overlap/stages.py [WIDTHxHEIGHT]
"""

from __future__ import annotations

import sys
import time

import open_clip
import torch
from clip_fabric.data.gpu import DeviceImageDecoder

from clip_fabric.benchmark import synthetic_photo
from clip_fabric.data.decode import CpuDecoder, pack_bytes

BATCH, SETS = 1024, 4


def rate(fn, reps: int = 6) -> float:
    """Images/s of ``fn`` (one batch per call), after two warm-up calls, waiting for the GPU at the end."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return BATCH * reps / (time.perf_counter() - start)


def main() -> None:
    width, height = (int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "500x375").split("x"))
    device = torch.device("cuda")
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    model = model.to(device, torch.bfloat16).eval()
    cpu = CpuDecoder(preprocess, open_clip.get_tokenizer("ViT-B-32"), mode="cpu")
    decoder = DeviceImageDecoder(cpu.spec, cpu, device)
    packed = []
    for s in range(SETS):  # distinct images per batch, so a batch read too early shows in its embeddings
        data, lengths = pack_bytes([synthetic_photo(s * BATCH + i, (width, height)) for i in range(BATCH)])
        packed.append((data.pin_memory(), lengths))
    kb = sum(len(d) for d, _ in packed) / SETS / BATCH / 1000

    def batch(s: int) -> dict:
        data, lengths = packed[s % SETS]
        rows = [{"key": str(i)} for i in range(BATCH)]
        return {"rows": rows, "images": None, "texts": None, "errors": [],
                "jpeg_data": data, "jpeg_lengths": lengths, "jpeg_rows": torch.arange(BATCH)}  # fmt: skip

    blobs = list(torch.split(packed[0][0], packed[0][1].tolist()))
    decoded = decoder._nvjpeg(blobs)
    pixels = torch.randn(BATCH, 3, 224, 224, device=device, dtype=torch.bfloat16)
    step = iter(range(10**9))
    with torch.inference_mode():
        print(f"{width}x{height} JPEGs, {kb:.0f} kB each, batches of {BATCH}, {torch.cuda.get_device_name()}")
        print(f"nvJPEG decode alone:            {rate(lambda: decoder._nvjpeg(blobs)):9,.0f} img/s")
        print(f"resize+crop+normalise alone:    {rate(lambda: decoder._resize(decoded)):9,.0f} img/s")
        print(f"ViT-B-32 bf16 encode alone:     {rate(lambda: model.encode_image(pixels)):9,.0f} img/s")
        print(f"device stage (decode+resize):   {rate(lambda: decoder(batch(next(step)))):9,.0f} img/s")

        def serial() -> None:
            model.encode_image(decoder(batch(next(step)))["images"].bfloat16())
            torch.cuda.synchronize()

        print(f"stage then encode, waiting:     {rate(serial):9,.0f} img/s")

        # The predict loop's order: the next batch is decoded while the GPU still encodes this one.
        def overlapped() -> None:
            model.encode_image(decoder(batch(next(step)))["images"].bfloat16())

        print(f"stage then encode, overlapped:  {rate(overlapped):9,.0f} img/s")

        reference = []
        for s in range(SETS):
            reference.append(model.encode_image(decoder(batch(s))["images"].bfloat16()).float())
            torch.cuda.synchronize()
        worst = 1.0
        outs = [(s, model.encode_image(decoder(batch(s))["images"].bfloat16())) for s in range(8 * SETS)]
        for s, out in outs:
            cos = torch.nn.functional.cosine_similarity(out.float(), reference[s % SETS]).min().item()
            worst = min(worst, cos)
        print(f"overlapped vs waited embeddings, {8 * SETS} batches: min cosine {worst:.7f}")


if __name__ == "__main__":
    main()
