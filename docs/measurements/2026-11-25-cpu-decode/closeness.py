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
decoders = {mode: CpuDecoder(preprocess, tokenizer, mode=mode) for mode in ("pil", "cpu")}
for size in [(500, 375), (1024, 768)]:
    data = [synthetic_photo(i, size) for i in range(32)]
    inputs, times = {}, {}
    for mode, decoder in decoders.items():
        decoder.image(data[0])
        start = time.perf_counter()
        inputs[mode] = torch.stack([decoder.image(b) for b in data])
        times[mode] = (time.perf_counter() - start) / len(data)
    with torch.no_grad():
        a, b = (torch.nn.functional.normalize(model.encode_image(inputs[m]), dim=-1) for m in ("pil", "cpu"))
    cos = (a * b).sum(-1)
    print(
        f"{size[0]}x{size[1]}: pil {times['pil'] * 1000:.2f} ms/image, "
        f"cpu {times['cpu'] * 1000:.2f} ms/image ({times['pil'] / times['cpu']:.2f}x); "
        f"cpu vs pil embeddings min cosine {cos.min():.7f}, "
        f"mean {cos.mean():.7f}"
    )
