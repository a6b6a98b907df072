"""``verify-precision``: the same inputs through float32 and lower precisions; how far the embeddings and
zero-shot labels move, and what the speed and memory gain is."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from typing_extensions import TYPE_CHECKING  # noqa: UP035 - not typing's: see below

from clip_fabric.config import DataArgs, ModelArgs, ZeroShotArgs
from clip_fabric.data import build_source
from clip_fabric.data.sizing import resolve_num_workers
from clip_fabric.launch import build_fabric
from clip_fabric.precision import build_precision, choose_auto, device_capability

# torch, Lightning and open_clip are imported by the functions that use them, so that --help and the
# other commands do not wait for them (docs/startup.md).
# The guard is typing_extensions': jsonargparse runs the typing.TYPE_CHECKING blocks of the modules
# whose signatures it reads, which would import them for --help.
if TYPE_CHECKING:
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.precision import Precision
    from torch import Tensor, nn

COLUMNS = (
    ("precision", "{}"),
    ("image_cos_mean", "{:.7f}"),
    ("image_cos_min", "{:.7f}"),
    ("text_cos_mean", "{:.7f}"),
    ("text_cos_min", "{:.7f}"),
    ("top1_agreement", "{:.4f}"),
    ("speed_ratio", "{:.2f}"),
    ("images_per_s", "{:.0f}"),
    ("texts_per_s", "{:.0f}"),
    ("peak_memory_mb", "{:.0f}"),
)


def setup(
    model: ModelArgs = ModelArgs(),
    data: DataArgs = DataArgs(num_samples=512, batch_size=128, num_workers=2),
    precision: str = "auto",
    tf32: bool = False,
    accelerator: str = "auto",
    zeroshot: ZeroShotArgs = ZeroShotArgs(templates="simple"),
    output: str | None = None,
) -> dict:
    """Run the same images and captions through float32 (TF32 off) and each precision asked for, and report
    the mean/min cosine similarity of their image and text embeddings, zero-shot top-1 agreement, the speed
    ratio (float32 time / this precision's time) and peak GPU memory.

    Args:
        model: The open_clip model and its weights.
        data: The inputs (synthetic images and captions by default); all are decoded once, before timing.
        precision: One name or several, comma-separated: ``32-true``, ``16-mixed``, ``16-true``,
            ``bf16-mixed``, ``bf16-true``, ``fp8``, ``auto``.
        tf32: TF32 matmuls in the precisions compared (never in the float32 reference).
        accelerator: ``cpu``, ``cuda`` or ``auto``; one device.
        zeroshot: Classes and prompt templates of the zero-shot classifier whose labels are compared.
        output: Also write the report as JSON to this path.

    Returns:
        The report: model, device, input counts and one row per precision.
    """
    from clip_fabric.precision.plugins import Fp32Precision

    if data.batch_size == "auto":
        raise ValueError("verify-precision times fixed batches: give --data.batch_size a number")
    plugins = _plugins(precision, tf32, accelerator)
    clip, images, texts, classes = _inputs(model, data, zeroshot)

    reference = _measure(Fp32Precision(tf32=False), accelerator, clip, images, texts, classes)
    capability, device_name = device_capability(accelerator)
    rows = []
    for name, plugin in plugins.items():
        got = _measure(plugin, accelerator, clip, images, texts, classes)
        resolved = choose_auto(capability, device_name)[0] if name == "auto" else name
        rows.append(_compare(resolved if name != "auto" else f"auto={resolved}", reference, got))
    report = {
        "model": model.name,
        "pretrained": model.pretrained,
        "device": device_name,
        "capability": list(capability) if capability else None,
        "tf32": tf32,
        "num_images": sum(len(b) for b in images),
        "num_texts": sum(len(b) for b in texts),
        "num_classes": len(classes[1]),
        "reference": {k: reference[k] for k in ("images_per_s", "texts_per_s", "peak_memory_mb")},
        "rows": rows,
    }
    print(format_table(report))
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2))
    return report


def _plugins(precision: str, tf32: bool, accelerator: str) -> dict[str, Precision]:
    """The plugin of each comma-separated ``--precision`` name, all built before any work, so that an
    impossible one (fp8 on an A100) fails at once."""
    names = [name.strip() for name in precision.split(",") if name.strip()]
    if not names:
        raise ValueError("--precision is empty: give one name or several, comma-separated")
    return {name: build_precision(name, tf32, accelerator) for name in names}


def _inputs(model: ModelArgs, data: DataArgs, zeroshot: ZeroShotArgs) -> tuple[nn.Module, list, list, tuple]:
    """The model, its decoded image and caption batches, and what ``build_classifier`` takes besides the
    text encoder (tokenizer, class names, templates, batch size); the options are checked first."""
    from clip_fabric.model import check_model, load_model
    from clip_fabric.zeroshot import load_class_names, load_templates

    check_model(model)
    class_names, templates = load_class_names(zeroshot.class_names), load_templates(zeroshot.templates)
    clip, preprocess, tokenizer = load_model(model)
    images, texts = _decode_inputs(data, preprocess, tokenizer)
    return clip, images, texts, (tokenizer, class_names, templates, data.batch_size)


def format_table(report: dict) -> str:
    """The report as a Markdown table, float32 reference first."""
    ref = report["reference"] | {"precision": "32-true (reference)", "speed_ratio": 1.0}
    lines = [
        f"{report['model']} on {report['device']}: {report['num_images']} images, {report['num_texts']} "
        f"captions, {report['num_classes']} classes",
        "| " + " | ".join(c for c, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in [ref, *report["rows"]]:
        cells = [fmt.format(row[c]) if row.get(c) is not None else "-" for c, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _decode_inputs(data: DataArgs, preprocess: Callable, tokenizer: Callable) -> tuple[list, list]:
    """All batches of images and captions of ``data``, decoded once so that timing sees only the model."""
    from torch.utils.data import DataLoader

    from clip_fabric.data.decode import CpuDecoder
    from clip_fabric.data.stream import ShardStream

    source = build_source(data)
    shards = source.shards()
    stream = ShardStream(
        source, shards, CpuDecoder(preprocess, tokenizer, data.max_image_pixels), data.batch_size, True, True
    )
    workers = min(resolve_num_workers(data.num_workers), len(shards))
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    images, texts = [], []
    for batch in loader:
        if batch.images is not None:
            images.append(batch.images)
        if batch.texts is not None:
            texts.append(batch.texts)
    if not images or not texts:
        raise ValueError("verify-precision needs images with captions: the source yielded none")
    return images, texts


def _measure(
    plugin: Precision,
    accelerator: str,
    clip: nn.Module,
    images: list[Tensor],
    texts: list[Tensor],
    classes: tuple,
) -> dict:
    """Embeddings, zero-shot labels, throughput and peak memory of ``clip`` under ``plugin``."""
    import copy

    import torch

    from clip_fabric.model import Embedder
    from clip_fabric.zeroshot import build_classifier

    fabric = build_fabric(accelerator, devices=1, precision=plugin)
    # A copy per precision: the plugins convert the module in place.
    encoder = fabric.setup_module(Embedder(copy.deepcopy(clip)))
    cuda = fabric.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()  # the previous precision's copy is gone; its cached blocks go too
    # Inputs go to the device before timing: the comparison is of the model, not of host copies.
    images, texts = [fabric.to_device(b) for b in images], [fabric.to_device(b) for b in texts]
    input_bytes = sum(b.numel() * b.element_size() for b in (*images, *texts))
    with torch.inference_mode():
        # Warm-up on a full batch: kernel selection and lazy initialisation are not timed.
        encoder(images=images[0], texts=texts[0])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        image_emb, image_s = _timed(fabric, lambda b: encoder(images=b)["image"], images)
        text_emb, text_s = _timed(fabric, lambda b: encoder(texts=b)["text"], texts)
        # Each precision builds its own classifier, as a run in that precision would.
        weights = build_classifier(lambda t: encoder(texts=fabric.to_device(t))["text"].cpu(), *classes)
    # Weights, activations and outputs; not the inputs, which are the same for every precision.
    peak = (torch.cuda.max_memory_allocated() - input_bytes) / 2**20 if cuda else None
    return {
        "image": image_emb,
        "text": text_emb,
        "labels": (image_emb @ weights.T).argmax(-1),
        "seconds": image_s + text_s,
        "images_per_s": len(image_emb) / image_s,
        "texts_per_s": len(text_emb) / text_s,
        "peak_memory_mb": peak,
    }


def _timed(
    fabric: Fabric, encode: Callable[[Tensor], Tensor], batches: list[Tensor], repeats: int = 2
) -> tuple[Tensor, float]:
    """Encode all batches (already on the device) ``repeats`` times; the fastest pass's seconds, until the
    last result is ready (the best of several passes is the least disturbed by the rest of the machine)."""
    import torch

    cuda = fabric.device.type == "cuda"
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = [encode(b) for b in batches]
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return torch.cat([o.float().cpu() for o in out]), best


def _compare(name: str, reference: dict, got: dict) -> dict:
    """One report row: how far ``got`` is from the float32 ``reference``."""
    image_cos = (reference["image"].double() * got["image"].double()).sum(-1)
    text_cos = (reference["text"].double() * got["text"].double()).sum(-1)
    return {
        "precision": name,
        "image_cos_mean": image_cos.mean().item(),
        "image_cos_min": image_cos.min().item(),
        "text_cos_mean": text_cos.mean().item(),
        "text_cos_min": text_cos.min().item(),
        "top1_agreement": (reference["labels"] == got["labels"]).double().mean().item(),
        "speed_ratio": reference["seconds"] / got["seconds"],
        "images_per_s": got["images_per_s"],
        "texts_per_s": got["texts_per_s"],
        "peak_memory_mb": got["peak_memory_mb"],
    }
