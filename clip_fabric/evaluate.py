"""``evaluate``: zero-shot top-1/top-5 accuracy on labelled images, or image<->text recall@k on image-caption
pairs, on one device or many, as JSON and a table comparable across models, precisions and strategies.

``setup`` validates everything and starts the ranks; ``main`` is the per-rank loop over this rank's shards.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from typing_extensions import TYPE_CHECKING  # noqa: UP035 - not typing's: see below

from clip_fabric.config import DataArgs, ModelArgs
from clip_fabric.data import Source, build_source
from clip_fabric.launch import build_fabric, die_with_launcher, launch_docs
from clip_fabric.modes import MODES

# torch, Lightning, torchmetrics and open_clip are imported by the functions that use them, so that
# --help and the other commands do not wait for them (docs/startup.md).
# The guard is typing_extensions': jsonargparse runs the typing.TYPE_CHECKING blocks of the modules
# whose signatures it reads, which would import them for --help.
if TYPE_CHECKING:
    from lightning.fabric import Fabric
    from torch import Tensor
    from torchmetrics import Metric

log = logging.getLogger(__name__)
Task = Literal["zeroshot", "retrieval"]
TOP_K = (1, 5)
RECALL_K = (1, 5, 10)


@launch_docs(
    "accelerator", "devices", "num_nodes", "strategy", "precision", "tf32", "timeout_s",
    "tensor_parallel_size",
)  # fmt: skip
def setup(
    model: ModelArgs = ModelArgs(),
    data: DataArgs = DataArgs(),
    task: Task = "zeroshot",
    class_names: str | None = None,
    templates: str = "openai",
    output: str = "evaluation.json",
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str = "32-true",
    tf32: bool = False,
    timeout_s: int = 1800,
    tensor_parallel_size: int | None = None,
) -> dict:
    """Measure an open_clip model on your own data: zero-shot accuracy or retrieval recall.

    Args:
        model: The open_clip model and its weights.
        data: The evaluation samples. ``zeroshot``: ``folder`` (one sub-folder per class; a label is the
            index of its sub-folder in sorted order) or ``webdataset`` (a ``cls`` field holding the class
            index). ``retrieval``: any format with captions; each image's own caption is its only match.
        task: ``zeroshot`` (top-1/top-5 accuracy) or ``retrieval`` (image->text and text->image
            recall@1/5/10).
        class_names: ``zeroshot``: ``imagenet`` (open_clip's names) or a file of one name per line, in
            label order; default for folders: the sub-folder names.
        templates: ``zeroshot``: prompt templates, ``openai`` (80), ``simple`` (7) or a file of one
            template per line with ``{}`` for the class name.
        output: JSON file the metrics, counts and configuration are written to.
        {launch}

    Returns:
        The report (also written to ``output``).
    """
    from clip_fabric.model import check_model

    _check_options(strategy, devices, num_nodes, output)
    check_model(model)
    source = build_source(data)
    classes, prompt_templates = _task_inputs(task, source, data, class_names, templates)
    config = {
        "task": task,
        "model": asdict(model),
        "data": asdict(data),
        "class_names": class_names,
        "templates": templates if TASKS[task].labelled else None,
        "precision": precision,
        "strategy": strategy,
        "accelerator": accelerator,
        "devices": devices,
        "num_nodes": num_nodes,
    }
    fabric = build_fabric(
        accelerator, devices, num_nodes, strategy, precision, tf32, timeout_s,
        tensor_parallel_size=tensor_parallel_size,
    )  # fmt: skip
    return fabric.launch(main, source, model, data, task, classes, prompt_templates, Path(output), config)


def _check_options(strategy: str, devices: int | str, num_nodes: int, output: str) -> None:
    from clip_fabric.strategies import strategy_class

    cls = strategy_class(strategy, devices, num_nodes)
    if cls is not None and not cls.encodes_texts_alone:  # the classifier's prompts have no image
        raise ValueError(
            f"--strategy {strategy} is not supported by evaluate (its text ranks only serve image-caption "
            "pairs); use ddp, model_parallel or tensor_parallel"
        )
    if Path(output).is_dir():
        raise ValueError(f"--output {output!r} is a folder; give the path of a JSON file")


def _task_inputs(
    task: Task, source: Source, data: DataArgs, class_names: str | None, templates: str
) -> tuple[list[str] | None, list | None]:
    """``zeroshot``: the class names (checked against the data's labels) and the prompt templates;
    ``retrieval`` needs neither."""
    from clip_fabric.zeroshot import load_templates

    if TASKS[task].labelled:
        return _class_names(source, data, class_names), load_templates(templates, "--templates")
    if class_names is not None:
        raise ValueError("--class_names is for --task zeroshot; retrieval matches each image to its caption")
    return None, None


def main(
    fabric: Fabric,
    source: Source,
    model_args: ModelArgs,
    data: DataArgs,
    task: Task,
    classes: list[str] | None,
    templates: list | None,
    output: Path,
    config: dict,
) -> dict:
    import torch
    from tqdm import tqdm

    from clip_fabric.data.paths import resolve_decode
    from clip_fabric.data.pipeline import device_batches
    from clip_fabric.encode import ChunkedEmbedder, choose_batch_size
    from clip_fabric.model import Embedder, load_model
    from clip_fabric.strategies import hooks

    die_with_launcher(fabric.local_rank)
    model, preprocess, tokenizer = load_model(model_args)
    # Split like predict's, so a batch that runs out of memory is retried in halves, not lost.
    module = fabric.setup_module(Embedder(model, frozenset({"image", "text"})))
    shards = source.shards()
    strategy = hooks(fabric.strategy)
    split = strategy.shard_split(fabric.global_rank, fabric.world_size)
    mine = shards[split[0] :: split[1]] if split else []
    decode = resolve_decode(data.decode, fabric.device, preprocess)
    spec = TASKS[task]
    mode = MODES[spec.mode]
    batch_size = choose_batch_size(
        fabric, module, model, data.batch_size, mode.towers, decode.device_bytes_per_sample
    )
    encoder = ChunkedEmbedder(module, batch_size, strategy.retries_oom)
    loader = device_batches(
        source, mine, preprocess, tokenizer, data, batch_size, fabric.device, decode, mode,
        fabric.world_size // config["num_nodes"],
    )  # fmt: skip
    # Ranks of one tensor-parallel group see the same batches: only the first one counts them.
    counts = strategy.writes
    progress = tqdm(desc=f"evaluating {len(mine)} shards", unit=" samples", disable=fabric.global_rank != 0)
    prompts = Prompts(tokenizer, classes, templates) if spec.labelled else None
    with torch.inference_mode():
        metrics, samples, errors = spec.measure(fabric, encoder, loader, counts, progress, prompts)
    progress.close()
    totals = {"samples": samples, "skipped": errors} | ({"classes": len(classes)} if classes else {})
    report = {"task": task, "metrics": metrics, "counts": totals, "model": config["model"]}
    report |= {k: config[k] for k in ("precision", "strategy")} | {"world_size": fabric.world_size}
    report["config"] = config
    if fabric.global_rank == 0:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2, default=str))
    fabric.print(format_table(report))
    fabric.print(f"clip_fabric: report written to {output}")
    return report


class Prompts(NamedTuple):
    """What a labelled task builds its zero-shot classifier from."""

    tokenizer: Callable
    classes: list[str]
    templates: list


def _zeroshot(fabric, encoder, loader, counts, progress, prompts: Prompts):
    """Top-k accuracy of ``argmax(image @ classifier.T)``; torchmetrics sums the counts over ranks."""
    import torch
    from torchmetrics.classification import MulticlassAccuracy

    from clip_fabric.zeroshot import sharded_classifier

    tokenizer, classes, templates = prompts
    weights = sharded_classifier(
        fabric, lambda tokens: encoder(None, fabric.to_device(tokens))["text"], tokenizer, classes, templates,
        encoder.max_batch,
    ).to(fabric.device)  # fmt: skip
    accuracy = {
        f"top{k}": MulticlassAccuracy(num_classes=len(classes), top_k=k, average="micro").to(fabric.device)
        for k in TOP_K
        if k <= len(classes)  # top-k of fewer than k classes would be 1 by construction
    }
    class_index = {name: i for i, name in enumerate(classes)}
    samples = errors = 0
    for batch in loader:
        errors += len(batch.errors) * counts
        progress.update(len(batch.rows))
        if not batch.rows:
            continue
        labels = torch.tensor([_label(row, class_index) for row in batch.rows], device=fabric.device)
        # Every rank encodes (tensor-parallel ranks compute each batch together); only counting ones count.
        images = encoder(batch.images, None)["image"].to(fabric.device)
        if counts:
            for metric in accuracy.values():
                metric.update(images @ weights.T, labels)
            samples += len(labels)
    samples, errors = _sum(fabric, samples, errors)
    metrics = {f"top{k}": _value(accuracy[f"top{k}"]) if f"top{k}" in accuracy else None for k in TOP_K}
    return metrics, samples, errors


def _retrieval(fabric, encoder, loader, counts, progress, prompts: None = None):
    """Recall@k both ways over the whole set: every rank gathers all candidates, ranks its own queries
    against them, and torchmetrics averages the hits over ranks."""
    from torchmetrics import MeanMetric

    images, texts, errors = [], [], 0
    for batch in loader:
        errors += len(batch.errors) * counts
        progress.update(len(batch.rows))
        if not batch.rows:
            continue
        # Every rank encodes (tensor-parallel ranks compute each batch together); only counting ones keep it.
        out = encoder(batch.images, batch.texts)
        if counts:
            images.append(out["image"].to(fabric.device))
            texts.append(out["text"].to(fabric.device))
    samples, errors = _sum(fabric, sum(len(x) for x in images), errors)
    all_images, first = _gather_rows(fabric, images)
    all_texts, _ = _gather_rows(fabric, texts)
    local = slice(first, first + sum(len(x) for x in images))
    recall: dict[str, Metric] = {}
    for direction, queries, candidates in (
        ("image_to_text", all_images[local], all_texts),
        ("text_to_image", all_texts[local], all_images),
    ):
        ranks = _rank_of_match(queries, candidates, local.start)
        for k in RECALL_K:
            metric = recall[f"{direction}_R@{k}"] = MeanMetric().to(fabric.device)
            if len(ranks):
                metric.update((ranks < k).float())
    return {name: _value(metric) for name, metric in recall.items()}, samples, errors


@dataclass(frozen=True)
class EvalTask:
    """One ``--task``: the predict mode whose batches it reads (``modes.MODES``), whether it takes class
    names and prompt templates, and how it measures: ``measure(fabric, encoder, loader, counts, progress,
    prompts)`` gives the metrics and the samples and skipped samples of all ranks."""

    mode: str
    labelled: bool
    measure: Callable[..., tuple[dict, int, int]]


TASKS: dict[str, EvalTask] = {
    "zeroshot": EvalTask("image", labelled=True, measure=_zeroshot),
    "retrieval": EvalTask("both", labelled=False, measure=_retrieval),  # its pairs need captions
}


def _gather_rows(fabric: Fabric, parts: list[Tensor]) -> tuple[Tensor, int]:
    """All ranks' rows in rank order, and where this rank's rows start. Ranks hold uneven counts, and
    ``all_gather`` needs equal shapes, so each pads to the largest count and the padding is cut after."""
    import torch

    local = torch.cat(parts) if parts else None
    shape = torch.tensor([len(local), local.shape[1]] if local is not None else [0, 0], device=fabric.device)
    if fabric.world_size == 1:
        return (local if local is not None else torch.zeros(0, 0, device=fabric.device)), 0
    shapes = fabric.all_gather(shape).view(fabric.world_size, 2)
    longest, dim = int(shapes[:, 0].max()), int(shapes[:, 1].max())
    padded = torch.zeros(longest, dim, device=fabric.device)
    if local is not None:
        padded[: len(local)] = local
    gathered = fabric.all_gather(padded).view(fabric.world_size, longest, dim)
    rows = torch.cat([gathered[r, : int(shapes[r, 0])] for r in range(fabric.world_size)])
    return rows, int(shapes[: fabric.global_rank, 0].sum())


def _rank_of_match(queries: Tensor, candidates: Tensor, first: int) -> Tensor:
    """For query ``i`` (global row ``first + i``), how many candidates score strictly above its own match,
    candidate ``first + i``: recall@k counts the queries where this is below k (a tie counts as found)."""
    import torch

    if not len(queries):
        return torch.zeros(0, device=queries.device)
    scores = queries @ candidates.T
    own = scores[torch.arange(len(queries)), first + torch.arange(len(queries))]
    return (scores > own[:, None]).sum(dim=1)


def _label(row: dict, class_index: dict[str, int]) -> int:
    """Webdataset: the ``cls`` field (a class index); folder: the class sub-folder of the key."""
    if "label" in row:
        label = row["label"]
        if not label.isdigit() or int(label) >= len(class_index):
            raise ValueError(
                f"sample {row['key']}: cls {label!r} is not a class index in 0..{len(class_index) - 1}; "
                "check --class_names against the data"
            )
        return int(label)
    folder = row["key"].split("/", 1)[0]
    if folder not in class_index:
        raise ValueError(f"sample {row['key']} has no class: webdataset samples need a cls field")
    return class_index[folder]


def _class_names(source: Source, data: DataArgs, spec: str | None) -> list[str]:
    """The names whose prompts make the classifier, in label order; checked against the data's labels."""
    from clip_fabric.zeroshot import load_class_names

    if data.format == "webdataset":
        if spec is None:
            raise ValueError(
                "--task zeroshot on webdataset needs --class_names (imagenet or a file of names, one a line, "
                "line i for cls i)"
            )
        return load_class_names(spec, "--class_names")
    if data.format != "folder":
        raise ValueError(
            f"--task zeroshot needs labelled data: --data.format folder (one sub-folder per class) or "
            f"webdataset (a cls field), not {data.format}"
        )
    top_level = [p for p in source.paths if "/" not in p]
    if top_level:
        raise ValueError(
            f"--data.source {data.source}: {len(top_level)} image(s) such as {top_level[0]!r} are not in a "
            "class sub-folder; put each image in the sub-folder of its class"
        )
    folders = sorted({p.split("/", 1)[0] for p in source.paths})
    if not folders:
        raise ValueError(f"--data.source {data.source}: no images in class sub-folders")
    if spec is None:
        return folders
    names = load_class_names(spec, "--class_names")
    if len(names) != len(folders):
        raise ValueError(
            f"--class_names {spec} has {len(names)} names but --data.source has {len(folders)} class "
            "sub-folders; give one name per sub-folder, in the sub-folders' sorted order"
        )
    return names


def _sum(fabric: Fabric, samples: int, errors: int) -> tuple[int, int]:
    """Samples and skipped samples over all ranks; every rank stops alike when there is nothing to measure."""
    import torch

    total = fabric.all_reduce(torch.tensor([samples, errors], device=fabric.device), reduce_op="sum")
    samples, errors = int(total[0]), int(total[1])
    if samples == 0:
        raise ValueError(f"no sample of --data.source could be read ({errors} skipped): nothing to evaluate")
    return samples, errors


def _value(metric: Metric) -> float:
    """The metric over all ranks: torchmetrics syncs its states at ``compute``."""
    return round(float(metric.compute()), 6)


def format_table(report: dict) -> str:
    """The metrics as a small fixed-width table, headed by what makes runs comparable."""
    counts = report["counts"]
    head = (
        f"{report['task']}  model {report['model']['name']} ({report['model']['pretrained'] or 'random'})  "
        f"precision {report['precision']}  strategy {report['strategy']}  world {report['world_size']}  "
        f"samples {counts['samples']}  skipped {counts['skipped']}"
    )
    width = max(len(name) for name in report["metrics"])
    lines = [head, f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for name, value in report["metrics"].items():
        lines.append(f"{name:<{width}}  " + (f"{100 * value:6.2f}%" if value is not None else "   n/a"))
    return "\n".join(lines)
