"""``predict``: embed images and/or captions into clip-retrieval-compatible output shards.

``setup`` validates everything and starts the ranks; ``main`` is the per-rank loop:
source -> decode (DataLoader workers) -> batch -> device -> encode -> write.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch
from lightning.fabric import Fabric
from tqdm import tqdm

from clip_fabric.config import MODE_OUTPUTS, DataArgs, Mode, ModelArgs, OutputArgs, ZeroShotArgs
from clip_fabric.data import Source, build_source
from clip_fabric.data.pipeline import choose_batch_size, device_batches, resolve_decode
from clip_fabric.encode import DEFAULT_BATCH_SIZE, SplittingEncoder
from clip_fabric.model import Encoder, check_model, load_model
from clip_fabric.precision import build_precision, resolve_precision
from clip_fabric.preemption import StopRequest, requeue_slurm_job
from clip_fabric.run_folder import RunFolder, fingerprint
from clip_fabric.strategies import build_strategy, data_parallel, partner_session, stop_agreed, writes
from clip_fabric.topology import TowerLayout
from clip_fabric.writers import ShardWriter
from clip_fabric.zeroshot import load_class_names, load_templates, sharded_classifier

log = logging.getLogger(__name__)


def setup(
    model: ModelArgs = ModelArgs(),
    data: DataArgs = DataArgs(),
    output: OutputArgs = OutputArgs(),
    mode: Mode = "image",
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str = "32-true",
    tf32: bool = False,
    timeout_s: int = 1800,
    threshold: float | None = None,
    tower_layout: TowerLayout = "adjacent",
    tensor_parallel_size: int | None = None,
    zeroshot: ZeroShotArgs = ZeroShotArgs(),
) -> dict:
    """Embed images and/or captions with an open_clip model, on one device or many.

    Args:
        model: The open_clip model and its weights.
        data: The input samples.
        output: Where the embeddings go.
        mode: What is computed: ``image`` or ``text`` embeddings; ``both`` (image-caption pairs:
            both embeddings and their cosine similarity); ``pair`` (only the similarity of each pair,
            in the metadata, for filtering datasets); ``zeroshot`` (image embeddings and the top-k
            classes with their probabilities).
        accelerator: Fabric accelerator: ``cpu``, ``cuda``, ``gpu`` or ``auto``.
        devices: Devices per node (a count, or ``auto``).
        num_nodes: Number of nodes.
        strategy: ``auto`` (one device, else data parallel), ``ddp``, ``model_parallel`` (the two towers
            on two devices of one process), ``hybrid`` (rank pairs, one tower each, pairs data
            parallel) or ``tensor_parallel`` (the vision tower sharded over a group of ranks); see
            docs/strategies.md.
        precision: ``32-true``, ``16-mixed`` / ``16-true`` (fp16, LayerNorms and final projections kept
            in fp32), ``bf16-mixed``, ``bf16-true``, ``fp8`` (H100/Ada with transformer-engine or
            torchao) or ``auto`` (chosen per GPU, with the reason printed); see docs/precision.md.
        tf32: Let float32 matrix products use TF32 tensor cores (Ampere and newer).
        threshold: ``pair`` and ``both`` modes: drop pairs whose similarity is below this (counted
            as ``filtered`` in the summary, not as errors).
        tower_layout: ``hybrid``: ``adjacent`` pairs ranks (2g, 2g+1), keeping a pair on one node;
            ``halves`` pairs rank g with g + world/2.
        tensor_parallel_size: ``tensor_parallel``: ranks that share one vision tower (default: the
            devices of a node); the others are data parallel.
        zeroshot: ``zeroshot`` mode: class names, prompt templates and the number of labels per image.
        timeout_s: Seconds a rank waits for the others in a collective before failing, so that a dead
            rank stops the job instead of hanging it; a rerun resumes.

    Returns:
        The run summary (also written to ``<output.dir>/summary.json``).
    """
    if strategy in ("hybrid", "model_parallel") and mode not in ("both", "pair"):
        raise ValueError(
            f"--strategy {strategy} splits the two towers: use it with --mode both or pair, not {mode}"
        )
    if mode == "zeroshot":
        if strategy == "hybrid":
            raise ValueError(
                "--mode zeroshot runs only the vision tower per batch: use --strategy ddp, not hybrid"
            )
        class_names, _ = load_class_names(zeroshot.class_names), load_templates(zeroshot.templates)
        if zeroshot.top_k > len(class_names):
            raise ValueError(f"--zeroshot.top_k {zeroshot.top_k} exceeds the {len(class_names)} class names")
    if threshold is not None and "similarity" not in MODE_OUTPUTS[mode]:
        raise ValueError(
            f"--threshold filters image-caption pairs: use it with --mode pair or both, not {mode}"
        )
    if data.decode == "gpu" and accelerator == "cpu":
        raise ValueError("--data.decode gpu needs --accelerator cuda (or auto on a GPU machine); use cpu")
    check_model(model)
    source = build_source(data, text_only=mode == "text")
    run = {
        "fingerprint": fingerprint(model, data, output, mode, resolve_precision(precision, accelerator))
        | {"threshold": threshold, "zeroshot": asdict(zeroshot) if mode == "zeroshot" else None},
        "config": {
            "model": asdict(model),
            "data": asdict(data),
            "output": asdict(output),
            "mode": mode,
            "accelerator": accelerator,
            "devices": devices,
            "num_nodes": num_nodes,
            "strategy": strategy,
            "precision": precision,
            "tf32": tf32,
            "threshold": threshold,
            "zeroshot": asdict(zeroshot),
        },
    }
    folder = RunFolder(output.dir)
    fabric = Fabric(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=build_strategy(strategy, devices, num_nodes, timeout_s, tower_layout, tensor_parallel_size),
        plugins=build_precision(precision, tf32, accelerator),
    )
    # Rank 0 holds the folder from here to its end; the ranks that Fabric's launch starts run setup too.
    with folder.lock(take=fabric.global_rank == 0):
        folder.check(run, source, output.overwrite)
        if fabric.global_rank == 0:  # before any process group: a failure here (full disk) ends at once
            folder.start(run, output.overwrite)
        return fabric.launch(main, source, model, data, output, mode, threshold, zeroshot, run)


def main(
    fabric: Fabric,
    source: Source,
    model_args: ModelArgs,
    data: DataArgs,
    output: OutputArgs,
    mode: Mode,
    threshold: float | None,
    zeroshot: ZeroShotArgs,
    run: dict,
) -> dict:
    """One rank's run. A stop signal is caught from here to the end, not only in the loop: one that lands
    while the ranks meet for the summary (a rank done early) must not kill that rank with the default
    action, which fails the other ranks in their collectives."""
    with StopRequest() as stop:
        folder = RunFolder(output.dir)
        fabric.barrier()

        model, preprocess, tokenizer = load_model(model_args)
        encoder = SplittingEncoder(
            fabric.setup_module(Encoder(model, MODE_OUTPUTS[mode], zeroshot.top_k)), DEFAULT_BATCH_SIZE
        )
        class_names = None
        if "topk" in MODE_OUTPUTS[mode]:
            class_names = load_class_names(zeroshot.class_names)
            text_features = encoder.module.text_features  # outside forward: autocast by hand

            def encode_text(tokens: torch.Tensor) -> torch.Tensor:
                with fabric.autocast():
                    return text_features(fabric.to_device(tokens))

            templates = load_templates(zeroshot.templates)
            encoder.module.classifier = sharded_classifier(
                fabric, encode_text, tokenizer, class_names, templates
            )
        shards = source.shards()
        done = folder.done_shards()
        split = data_parallel(fabric.strategy, fabric.global_rank, fabric.world_size)
        mine = [s for s in shards[split[0] :: split[1]] if s.index not in done] if split else []
        decode = resolve_decode(data.decode, fabric.device, preprocess) if mode != "text" else "none"
        batch_size = choose_batch_size(
            fabric, encoder.module, model, data,
            images=mode != "text", texts=mode not in ("image", "zeroshot"), decode=decode,
        )  # fmt: skip
        encoder.max_batch = batch_size
        batches = device_batches(
            source, mine, preprocess, tokenizer, data, batch_size, fabric.device, decode,
            need_image=mode != "text", need_text=mode != "image",
        )  # fmt: skip
        writer = ShardWriter(
            output.dir,
            len(shards),
            output.dtype,
            threshold,
            enabled=writes(fabric.strategy),
            class_names=class_names,
        )
        names = {s.index: s.name for s in mine}
        rows = errors = 0
        latencies: list[float] = []
        steady: dict = {"start": None, "rows": 0}

        def write(done: _Encoded | None) -> None:
            """Hand a batch's results to the writer once their copy to the host has landed."""
            nonlocal rows, errors
            if done is None:
                return
            batch, outputs = done.batch, done.host()
            writer.add(
                batch["shard"], names[batch["shard"]], batch["rows"], batch["errors"], outputs, batch["last"]
            )
            rows += len(batch["rows"]) * writer.enabled
            errors += len(batch["errors"]) * writer.enabled
            latencies.append(time.perf_counter() - done.started)
            progress.update(len(batch["rows"]))
            if steady["start"] is None:  # steady state: from the first batch out, past start-up and warm-up
                steady["start"], steady["rows"] = time.perf_counter(), rows

        if fabric.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(fabric.device)
        start = time.perf_counter()
        progress = tqdm(
            desc=f"embedding {len(mine)} shards", unit=" samples", disable=fabric.global_rank != 0
        )
        pending: _Encoded | None = None
        stopping = False  # this rank's signal, or a signal to a rank it computes batches with
        with torch.inference_mode(), partner_session(fabric.strategy, encoder.module):
            for batch in batches:
                stopping = stop_agreed(fabric.strategy, bool(stop))
                if stopping:
                    write(pending)
                    pending = None
                    if batch["shard"] not in writer.open_shards:
                        if not writer.open_shards:
                            break
                        continue  # a shard not begun before the signal is left whole for the rerun
                # This batch's results copy back while the next batch is queued on the device.
                pending, previous = _Encoded.start(encoder, batch), pending
                write(previous)
            write(pending)
        writer.close()
        progress.close()
        end = time.perf_counter()
        seconds = end - start
        rate = _steady_rate(steady, rows, end)
        # float64 holds row counts exactly; the steady rates of the ranks add up to the job's.
        unmeasured = (
            rate is None and rows > 0
        )  # ranks that wrote nothing (text ranks, idle ranks) do not vote
        local = torch.tensor(
            [rows, errors, rate or 0.0, unmeasured], dtype=torch.float64, device=fabric.device
        )
        counts = fabric.all_reduce(local, reduce_op="sum")
        rows = int(counts[0])
        fabric.barrier()
        summary = folder.summarize(run, len(shards), rows, int(counts[1]), seconds, fabric.world_size)
        summary["this_run"] |= {
            "batch_size": batch_size,
            "decode": decode,
            "batch_latency_ms": _percentiles(latencies),
            "steady_samples_per_s": round(float(counts[2]), 1) if not counts[3] else None,
            "peak_memory_gb": round(torch.cuda.max_memory_allocated(fabric.device) / 1e9, 3)
            if fabric.device.type == "cuda"
            else None,
        }
        if fabric.global_rank == 0:
            folder.write_summary(summary)
            if (
                (stop or stopping)
                and summary["shards_done"] < summary["shards_total"]
                and not requeue_slurm_job()
            ):
                fabric.print("clip_fabric: stopped on a signal; rerun the same command to resume")
        fabric.print(
            f"clip_fabric: {summary['rows']} rows, {summary['errors']} skipped samples (errors/), "
            + (f"{summary['filtered']} pairs under --threshold, " if summary["filtered"] else "")
            + f"{summary['shards_done']}/{summary['shards_total']} shards in {output.dir}; "
            f"this run {rows} rows at {summary['this_run']['samples_per_s'] or 0:.1f} samples/s "
            f"on {fabric.world_size} rank(s)"
        )
        return summary


class _Encoded:
    """A batch whose results are on their way to pinned host memory."""

    def __init__(self, batch: dict, outputs: dict[str, torch.Tensor], started: float) -> None:
        self.batch, self.started = batch, started
        self.outputs = {k: v.to("cpu", non_blocking=True) for k, v in outputs.items()}
        # Each copy runs on its own device's stream (model_parallel's towers sit on two GPUs).
        self.events = []
        for device in {v.device for v in outputs.values() if v.device.type == "cuda"}:
            with torch.cuda.device(device):
                event = torch.cuda.Event()
                event.record()
                self.events.append(event)

    @classmethod
    def start(cls, encoder: SplittingEncoder, batch: dict) -> _Encoded:
        started = time.perf_counter()
        return cls(batch, encoder(batch["images"], batch["texts"]) if batch["rows"] else {}, started)

    def host(self) -> dict:
        for event in self.events:
            event.synchronize()
        return {k: v.numpy() for k, v in self.outputs.items()}


def _steady_rate(steady: dict, rows: int, end: float) -> float | None:
    """This rank's samples/s after its first batch was written; None with too little to measure."""
    if steady["start"] is None or end - steady["start"] < 0.5 or rows <= steady["rows"]:
        return None
    return round((rows - steady["rows"]) / (end - steady["start"]), 1)


def _percentiles(values: list[float]) -> dict | None:
    if not values:
        return None
    ordered = sorted(values)
    pick = lambda q: round(1000 * ordered[min(int(q * len(ordered)), len(ordered) - 1)], 2)  # noqa: E731
    return {"p50": pick(0.5), "p95": pick(0.95), "mean": round(1000 * sum(ordered) / len(ordered), 2)}
