"""Issue 18's FP8 probe: bf16-true, Transformer Engine FP8 and torchao FP8 on open_clip towers, against fp32.

For each tower (random-init weights, seed 0; the same images and captions for every precision) it computes
float32 embeddings (TF32 off) once, then per configuration: images/s and texts/s (best of 3 passes over
batches already on the GPU, after a warm-up batch), peak memory of the model copy (weights, activations,
outputs; the float32 master and the inputs excluded), mean/min cosine of image and text embeddings to
float32, and zero-shot top-1 agreement to float32 (1000 ImageNet class prompts, one template). It also times
the towers' GEMM shapes alone in bf16 and FP8 (``gemms``) and profiles chosen configurations' kernels
(``--profile``). Rows go to ``--out`` (JSON) as they finish, so a run cut short keeps what it measured.

Cosines of random-weight embeddings are a numerical distance (the same function computed two ways), not an
accuracy; zero-shot agreement on random weights is pessimistic (1000 near-tied logits).

Run by ``run.sh`` beside it, which installs the wheels and builds Transformer Engine's PyTorch extension.
"""

# ruff: noqa: B023 - the GEMM cases' closures run inside their own loop iteration
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
import traceback
from pathlib import Path

import open_clip
import torch
from lightning.fabric import Fabric
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from clip_fabric.model import Encoder, patch_embedding_as_matmul
from clip_fabric.precision import fp8 as fp8mod
from clip_fabric.precision.plugins import Fp32NormsHalfPrecision, Fp32Precision

START = time.time()
DEV = os.environ.get("PROBE_DEVICE", "cuda")  # "cpu" only to dry-run the script
CUDA = DEV == "cuda"


def plugin_for(name: str):
    """(plugin, model transform before setup, compile blocks after setup) for a configuration name."""
    if name == "bf16-true":  # clip_fabric's --precision bf16-true
        return Fp32NormsHalfPrecision("bf16-true", fp32_norms=False, gelu_epilogue=True), None, False
    if name == "bf16-true-fp32norms":  # the FP8 plugins' non-FP8 part
        return Fp32NormsHalfPrecision("bf16-true", fp32_norms=True, gelu_epilogue=True), None, False
    if name == "bf16-true-compiled":
        return Fp32NormsHalfPrecision("bf16-true", fp32_norms=False, gelu_epilogue=True), None, True
    if name == "ao-row":  # the torchao plugin as it was: eager, MLP Linears only
        return fp8mod.TorchAOFloat8Precision(), None, False
    if name.startswith("ao-"):  # ao-{row,tensor}-split[-compiled]
        parts = name.split("-")
        plugin = fp8mod.TorchAOFloat8Precision(
            granularity=parts[1], split_attention="split" in parts, compile="compiled" in parts
        )
        return plugin, None, False
    if name.startswith("te-lightning"):  # te-lightning[-split][-current]: Lightning's plugin as it was
        from lightning.fabric.plugins.precision import TransformerEnginePrecision

        recipe = fp8mod.te_recipe("current") if "current" in name else None
        plugin = TransformerEnginePrecision(weights_dtype=torch.bfloat16, recipe=recipe)
        return plugin, (fp8mod.split_attention if "split" in name else None), False
    if name.startswith("te-fused-"):  # te-fused-{current,delayed,block}-{all,image}[-fp8w]
        parts = name.split("-")
        plugin = fp8mod.TransformerEngineFp8Precision(
            recipe=parts[2], towers=parts[3], fp8_weights="fp8w" in parts
        )
        return plugin, None, False
    raise ValueError(name)


def inputs(n_images: int, n_texts: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 3, 224, 224, generator=gen)
    rng = random.Random(seed)
    words = [c for c in IMAGENET_CLASSNAMES]
    captions = [
        f"a photo of a {rng.choice(words)} next to a {rng.choice(words)}, {rng.choice(words)}"
        for _ in range(n_texts)
    ]
    texts = open_clip.tokenize(captions)
    prompts = [f"a photo of a {c}." for c in IMAGENET_CLASSNAMES]
    classes = open_clip.tokenize(prompts + prompts[: -len(prompts) % 256])  # full batches of up to 256
    return images, texts, classes


def batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [b.to(DEV) for b in x.split(size)]


def sync():
    if CUDA:
        torch.cuda.synchronize()


def encode_all(fn, bs):
    return torch.cat([fn(b).float() for b in bs])


def best_of(fn, bs, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = [fn(b) for b in bs]
        sync()
        best = min(best, time.perf_counter() - t)
    return torch.cat([o.float() for o in out]), best


def setup_encoder(master, name):
    plugin, transform, compile_blocks = plugin_for(name)
    model = copy.deepcopy(master)
    if transform is not None:
        transform(model)
    encoder = Encoder(model)
    fabric = Fabric(accelerator=DEV, devices=1, plugins=plugin)
    wrapped = fabric.setup_module(encoder)
    if compile_blocks:
        for _, _, block in fp8mod._blocks(encoder.model, "all"):
            block.compile()
    return wrapped


def cosines(a, b):
    c = (a.double() * b.double()).sum(-1)
    return c.mean().item(), c.min().item()


def measure(master, name, data, ref, batch):
    images, texts, classes = data
    base = torch.cuda.memory_allocated() if CUDA else 0
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    enc = setup_encoder(master, name)
    setup_s = time.perf_counter() - t0
    with torch.inference_mode():
        t0 = time.perf_counter()
        enc(images=images[0])
        enc(texts=texts[0])
        sync()
        warm_s = time.perf_counter() - t0
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        img, img_s = best_of(lambda b: enc(images=b)["image"], images)
        txt, txt_s = best_of(lambda b: enc(texts=b)["text"], texts)
        cls = encode_all(lambda b: enc(texts=b)["text"], classes)[: len(IMAGENET_CLASSNAMES)]
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if CUDA else 0.0
    labels = (img @ cls.T).argmax(-1)
    ic, icmin = cosines(img, ref["image"])
    tc, tcmin = cosines(txt, ref["text"])
    row = {
        "config": name,
        "batch": batch,
        "images_per_s": len(img) / img_s,
        "texts_per_s": len(txt) / txt_s,
        "image_cos_mean": ic,
        "image_cos_min": icmin,
        "text_cos_mean": tc,
        "text_cos_min": tcmin,
        "top1_agreement": (labels == ref["labels"]).double().mean().item(),
        "peak_memory_mb": peak,
        "setup_s": setup_s,
        "warmup_s": warm_s,
    }
    enc = None  # frees the copy before the next configuration
    return row


def reference(master, data, path: Path):
    if path.exists():
        return {k: v.to(DEV) for k, v in torch.load(path).items()}
    images, texts, classes = data
    plugin = Fp32Precision(tf32=False)
    fabric = Fabric(accelerator=DEV, devices=1, plugins=plugin)
    enc = fabric.setup_module(Encoder(master))
    with torch.inference_mode():
        img = encode_all(lambda b: enc(images=b)["image"], images)
        txt = encode_all(lambda b: enc(texts=b)["text"], texts)
        cls = encode_all(lambda b: enc(texts=b)["text"], classes)[: len(IMAGENET_CLASSNAMES)]
    ref = {"image": img, "text": txt, "labels": (img @ cls.T).argmax(-1)}
    torch.save({k: v.cpu() for k, v in ref.items()}, path)
    return ref


def flops_per_image(master) -> float:
    """Matmul FLOPs of one image through the image tower: its Linear layers, attention and patch matmul."""
    vis = master.visual
    tokens = vis.grid_size[0] * vis.grid_size[1] + 1
    total = 0.0
    for block in vis.transformer.resblocks:
        width = block.ln_1.normalized_shape[0]
        linear = 4 * width * width + 2 * width * block.mlp.c_fc.out_features
        total += 2 * linear * tokens + 4 * tokens * tokens * width
    conv = vis.conv1.weight
    total += 2 * conv.numel() * (tokens - 1)
    return total


def gemm_bench(master, batch) -> list[dict]:
    """bf16 and FP8 (torch._scaled_mm) times of the image tower's four GEMM shapes at ``batch`` images."""
    vis = master.visual
    tokens = (vis.grid_size[0] * vis.grid_size[1] + 1) * batch
    block = vis.transformer.resblocks[0]
    width, hidden = block.ln_1.normalized_shape[0], block.mlp.c_fc.out_features
    rows = []
    fp8 = torch.float8_e4m3fn
    for label, k, n in (
        ("qkv", width, 3 * width),
        ("out", width, width),
        ("fc1", width, hidden),
        ("fc2", hidden, width),
    ):
        a = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        a8, b8 = a.to(fp8), b.to(fp8)
        one = torch.ones((), device="cuda")
        ra, rb = torch.ones(tokens, 1, device="cuda"), torch.ones(1, n, device="cuda")
        cases = {
            "bf16": lambda: a @ b.t(),
            "fp8_tensor_fast": lambda: torch._scaled_mm(
                a8, b8.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True
            ),
            "fp8_tensor_split": lambda: torch._scaled_mm(
                a8, b8.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=False
            ),
            "fp8_row_fast": lambda: torch._scaled_mm(
                a8, b8.t(), ra, rb, out_dtype=torch.bfloat16, use_fast_accum=True
            ),
            "cast_bf16_to_fp8": lambda: (a * 1.0).to(fp8),
        }
        for case, fn in cases.items():
            try:
                for _ in range(3):
                    fn()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                times = []
                for _ in range(10):
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                ms = sorted(times)[len(times) // 2]
                tflops = 2 * tokens * k * n / ms / 1e9 if case != "cast_bf16_to_fp8" else None
                rows.append(
                    {"gemm": label, "m": tokens, "k": k, "n": n, "case": case, "ms": ms, "tflops": tflops}
                )
            except Exception as err:  # noqa: BLE001
                rows.append({"gemm": label, "case": case, "error": str(err)[:200]})
        a = b = a8 = b8 = None
    return rows


CATEGORIES = (
    ("gemm_fp8", ("e4m3", "f8f8", "fp8", "_e4m3", "sm90_xmma_gemm_e4m3", "_f8_")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("gemm_bf16", ("gemm", "nvjet", "cutlass", "sm90_xmma", "xmma", "ampere")),
    ("norm", ("layernorm", "layer_norm", "ln_fwd", "norm")),
    ("cast_amax", ("cast", "quantize", "amax", "transpose", "scale", "fp8")),
    ("gelu", ("gelu",)),
)


def category(kernel: str) -> str:
    low = kernel.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "elementwise_other"


def profile(master, name, data, out_lines: list[str]) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    images = data[0]
    enc = setup_encoder(master, name)
    with torch.inference_mode():
        enc(images=images[0])
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            enc(images=images[0])
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
    # Kernels are the averages with device time and no CPU time of their own.
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0 and e.self_cpu_time_total == 0]
    sums: dict[str, float] = {}
    for e in kernels:
        sums[category(e.key)] = sums.get(category(e.key), 0.0) + e.self_device_time_total / 1e3
    total = sum(sums.values())
    out_lines.append(
        f"## {name}: wall {wall * 1e3:.1f} ms, GPU kernels {total:.1f} ms, one batch of {len(images[0])}"
    )
    ordered = sorted(sums.items(), key=lambda kv: -kv[1])
    out_lines.append("categories (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in ordered))
    kernels.sort(key=lambda e: -e.self_device_time_total)
    for e in kernels[:18]:
        ms = e.self_device_time_total / 1e3
        out_lines.append(f"  {ms:8.2f} ms  x{e.count:<5} {category(e.key):17} {e.key[:150]}")
    listing = [[e.key[:200], e.count, e.self_device_time_total / 1e3] for e in kernels]
    enc = None  # frees the copy before the next configuration
    return {"config": name, "wall_ms": wall * 1e3, "gpu_ms": total, "categories_ms": sums, "kernels": listing}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--towers", default="ViT-L-14,ViT-H-14,ViT-bigG-14")
    parser.add_argument("--configs", default="bf16-true")
    parser.add_argument("--big-configs", default="", help="extra configurations for ViT-bigG-14 only")
    parser.add_argument("--profile", default="", help="configurations to profile on the last tower")
    parser.add_argument("--gemms", action="store_true")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--big-images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--budget-s", type=float, default=300)
    parser.add_argument("--ref-dir", default="/tmp/fp8ref")
    parser.add_argument("--out", required=True)
    parser.add_argument("--profile-out", default=None)
    args = parser.parse_args()
    Path(args.ref_dir).mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "te_status": fp8mod.transformer_engine_status(),
        "towers": {},
    }
    try:
        import torchao

        report["torchao"] = torchao.__version__
    except ImportError:
        report["torchao"] = None
    out = Path(args.out)
    prof_lines: list[str] = []
    for tower in args.towers.split(","):
        torch.manual_seed(0)
        master = open_clip.create_model(tower).eval().requires_grad_(False)
        patch_embedding_as_matmul(master)
        master = master.to(DEV)
        big = "bigG" in tower
        n = args.big_images if big else args.images
        images, texts, classes = inputs(n, n)
        data = (batches(images, args.batch), batches(texts, args.batch), batches(classes, args.batch))
        entry = report["towers"].setdefault(tower, {"flops_per_image": flops_per_image(master), "rows": []})
        ref = reference(master, data, Path(args.ref_dir) / f"ref_{tower}.pt")
        configs = [c for c in args.configs.split(",") if c]
        if big:
            configs += [c for c in args.big_configs.split(",") if c]
        for name in configs:
            if time.time() - START > args.budget_s:
                entry["rows"].append({"config": name, "error": "skipped: over the probe's time budget"})
                continue
            try:
                row = measure(master, name, data, ref, args.batch)
                row["tflops_image"] = row["images_per_s"] * entry["flops_per_image"] / 1e12
            except Exception as err:  # noqa: BLE001 - one failed configuration is a row
                row = {"config": name, "error": f"{type(err).__name__}: {str(err)[:400]}"}
                traceback.print_exc()
            entry["rows"].append(row)
            print(json.dumps({"tower": tower, **row}), flush=True)
            if CUDA:
                torch.cuda.empty_cache()
            out.write_text(json.dumps(report, indent=1))
        if args.gemms and big:
            entry["gemms"] = gemm_bench(master, args.batch)
            out.write_text(json.dumps(report, indent=1))
        if args.profile and tower == args.towers.split(",")[-1]:
            entry["profiles"] = []
            for name in args.profile.split(","):
                if time.time() - START > args.budget_s + 60:
                    break
                try:
                    entry["profiles"].append(profile(master, name, data, prof_lines))
                except Exception as err:  # noqa: BLE001
                    prof_lines.append(f"## {name}: {type(err).__name__}: {str(err)[:300]}")
                torch.cuda.empty_cache()
            out.write_text(json.dumps(report, indent=1))
            if args.profile_out:
                Path(args.profile_out).write_text("\n".join(prof_lines) + "\n")
        del master, data, ref
        torch.cuda.empty_cache()
    out.write_text(json.dumps(report, indent=1))
    for tower, entry in report["towers"].items():
        print(f"\n{tower}")
        for r in entry["rows"]:
            if "error" in r:
                print(f"  {r['config']:32} ERROR {r['error'][:150]}")
            else:
                print(
                    f"  {r['config']:32} img/s {r['images_per_s']:8.0f} txt/s {r['texts_per_s']:8.0f} "
                    f"icos {r['image_cos_mean']:.6f} tcos {r['text_cos_mean']:.6f} "
                    f"top1 {r['top1_agreement']:.3f} "
                    f"MB {r['peak_memory_mb']:7.0f} warm {r['warmup_s']:.1f}s"
                )
    print(f"probe done in {time.time() - START:.0f} s", flush=True)
    os.sys.stdout.flush()


if __name__ == "__main__":
    main()
