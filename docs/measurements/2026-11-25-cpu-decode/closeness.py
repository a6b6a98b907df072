"""The CPU decode paths against open_clip's own preprocess (``pil``), on this machine's CPU, one thread:
time per image and the cosine of ViT-B-32 (random init) embeddings. Usage, from the repository root:
HF_HUB_OFFLINE=1 python docs/measurements/2026-11-25-cpu-decode/closeness.py"""

import time

import open_clip
import torch

from clip_fabric.benchmark import synthetic_photo
from clip_fabric.data.decode import CpuDecoder, simplejpeg

torch.set_num_threads(1)
torch.manual_seed(0)
model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
model.eval()
tokenizer = open_clip.get_tokenizer("ViT-B-32")
print(f"simplejpeg installed: {simplejpeg is not None}")
decoders = {
    "pil": CpuDecoder(preprocess, tokenizer, mode="pil"),
    "cpu": CpuDecoder(preprocess, tokenizer, mode="cpu"),
    "cpu+dct": CpuDecoder(preprocess, tokenizer, mode="cpu", scale_jpegs=True),  # --data.dct_scaling true
}
for size in [(500, 375), (1024, 768)]:
    data = [synthetic_photo(i, size) for i in range(32)]
    inputs, times = {}, {}
    for mode, decoder in decoders.items():
        decoder.image(data[0])
        start = time.perf_counter()
        inputs[mode] = torch.stack([decoder.image(b) for b in data])
        times[mode] = (time.perf_counter() - start) / len(data)
    with torch.no_grad():
        embeddings = {
            m: torch.nn.functional.normalize(model.encode_image(x), dim=-1) for m, x in inputs.items()
        }
    for mode in ("cpu", "cpu+dct"):
        cos = (embeddings["pil"] * embeddings[mode]).sum(-1)
        print(
            f"{size[0]}x{size[1]} {mode}: {times[mode] * 1000:.2f} ms/image against pil's "
            f"{times['pil'] * 1000:.2f} ({times['pil'] / times[mode]:.2f}x); embeddings against pil: "
            f"min cosine {cos.min():.7f}, mean {cos.mean():.7f}"
        )
