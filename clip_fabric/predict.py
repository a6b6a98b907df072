"""``predict``: embed images and/or captions into clip-retrieval-compatible output shards.

``setup`` validates everything and starts the ranks; ``main`` is the per-rank loop:
source -> decode (DataLoader workers) -> batch -> device -> encode -> write.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from typing_extensions import TYPE_CHECKING  # noqa: UP035 - not typing's: see below

from clip_fabric.config import DataArgs, ModelArgs, OutputArgs, ZeroShotArgs
from clip_fabric.data import Shard, Source, build_source
from clip_fabric.data.sizing import resolve_num_workers
from clip_fabric.launch import build_fabric, die_with_launcher, job_store, launch_docs, launched_ranks
from clip_fabric.modes import MODES, Mode, ModeName
from clip_fabric.precision import resolve_precision, tf32_fingerprint
from clip_fabric.preemption import JobStop, StopRequest, requeue_slurm_job
from clip_fabric.progress import Progress, final_line, phase, process_seconds
from clip_fabric.reasons import folder_reasons
from clip_fabric.run_folder import SUMMARY_FILE, RunFolder, fingerprint
from clip_fabric.topology import TowerLayout

# torch, Lightning and open_clip are imported by the functions that use them, so that --help and the
# other commands do not wait for them (docs/startup.md).
# The guard is typing_extensions': jsonargparse runs the typing.TYPE_CHECKING blocks of the modules
# whose signatures it reads, which would import them for --help.
if TYPE_CHECKING:
    import torch
    from lightning.fabric import Fabric

    from clip_fabric.encode import ChunkedEmbedder

log = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything a rank needs, validated in ``setup`` before any process starts."""

    source: Source
    model: ModelArgs
    data: DataArgs
    output: OutputArgs
    mode: Mode
    threshold: float | None
    zeroshot: ZeroShotArgs
    run: dict
    started: float


@launch_docs(
    "accelerator", "devices", "num_nodes", "strategy", "precision", "tf32", "timeout_s", "tower_layout",
    "tensor_parallel_size",
)  # fmt: skip
def setup(
    model: ModelArgs = ModelArgs(),
    data: DataArgs = DataArgs(),
    output: OutputArgs = OutputArgs(),
    mode: ModeName = "image",
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str = "auto",
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
            classes with their probabilities; captions are not needed).
        threshold: ``pair`` and ``both`` modes: drop pairs whose similarity is below this (counted
            as ``filtered`` in the summary, not as errors).
        zeroshot: ``zeroshot`` mode: class names, prompt templates and the number of labels per image.
        {launch}

    Returns:
        The run summary (also written to ``<output.dir>/summary.json``).
    """
    started = time.perf_counter()
    job_mode = MODES[mode]
    _check(job_mode, model, zeroshot, threshold, data, accelerator, strategy, devices, num_nodes)
    source = build_source(data, text_only=not job_mode.reads_images)
    if not source.shards():  # said before the model loads, and no folder, lock or state file is left
        return {"rows": 0, "errors": 0, "filtered": 0, "shards_done": 0, "shards_total": 0, "this_run": None}
    launch = {"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes, "strategy": strategy,
              "precision": precision, "tf32": tf32}  # fmt: skip
    run = _run_record(model, data, output, mode, threshold, zeroshot, launch)
    folder = RunFolder(output.dir)
    fabric = build_fabric(
        accelerator, devices, num_nodes, strategy, precision, tf32, timeout_s, tower_layout,
        tensor_parallel_size,
    )  # fmt: skip
    # Rank 0 holds the folder from here to its end; the ranks that Fabric's launch starts run setup too.
    with folder.lock(take=fabric.global_rank == 0):
        folder.check(run, source, output.overwrite)
        if fabric.global_rank == 0:  # before any process group: a failure here (full disk) ends at once
            folder.start(run, output.overwrite)
        job = Job(source, model, data, output, job_mode, threshold, zeroshot, run, started)
        return fabric.launch(main, job)


def _check(
    job_mode: Mode, model: ModelArgs, zeroshot: ZeroShotArgs, threshold: float | None, data: DataArgs,
    accelerator: str, strategy: str, devices: int | str, num_nodes: int,
) -> None:  # fmt: skip
    """What setup refuses before any work: a mode the strategy cannot run, zero-shot classes that do not
    load, a GPU decode without a GPU, a model open_clip does not know."""
    from clip_fabric.model import check_model
    from clip_fabric.strategies import strategy_class
    from clip_fabric.zeroshot import load_class_names, load_templates

    cls = strategy_class(strategy, devices, num_nodes)
    job_mode.check(threshold, cls is not None and cls.splits_towers, strategy)
    if job_mode.labels:
        class_names, _ = load_class_names(zeroshot.class_names), load_templates(zeroshot.templates)
        if zeroshot.top_k > len(class_names):
            raise ValueError(f"--zeroshot.top_k {zeroshot.top_k} exceeds the {len(class_names)} class names")
    if data.decode == "gpu" and accelerator == "cpu":
        raise ValueError("--data.decode gpu needs --accelerator cuda (or auto on a GPU machine); use cpu")
    check_model(model)


def _run_record(
    model: ModelArgs, data: DataArgs, output: OutputArgs, mode: ModeName, threshold: float | None,
    zeroshot: ZeroShotArgs, launch: dict,
) -> dict:  # fmt: skip
    """run.json: what must not change for a resume (the fingerprint) and the options as given."""
    from clip_fabric.model import hf_hub_revision

    labels = MODES[mode].labels
    precision, tf32, accelerator = launch["precision"], launch["tf32"], launch["accelerator"]
    return {
        "fingerprint": fingerprint(
            model, data, output, mode, resolve_precision(precision, accelerator), hf_hub_revision(model)
        )
        | {"threshold": threshold, "zeroshot": asdict(zeroshot) if labels else None}
        | tf32_fingerprint(precision, tf32, accelerator, float32_logits=labels),
        "config": {"model": asdict(model), "data": asdict(data), "output": asdict(output), "mode": mode}
        | launch
        | {"threshold": threshold, "zeroshot": asdict(zeroshot)},
    }


def main(fabric: Fabric, job: Job) -> dict:
    """One rank's run. A stop signal is caught from here to the end, not only in the loop: one that lands
    while the ranks meet for the summary (a rank done early) must not kill that rank with the default
    action, which fails the other ranks in their collectives."""
    import torch

    from clip_fabric.data.paths import PATHS, resolve_decode
    from clip_fabric.data.pipeline import device_batches
    from clip_fabric.encode import choose_batch_size, encode_in_order
    from clip_fabric.model import load_model
    from clip_fabric.strategies import hooks
    from clip_fabric.writers import ShardWriter

    die_with_launcher(fabric.local_rank)
    with StopRequest(lambda: launched_ranks(fabric)) as stop:
        folder, strategy = RunFolder(job.output.dir), hooks(fabric.strategy)
        fabric.barrier()
        with phase(fabric.print, f"loading model {job.model.name}"):
            model, preprocess, tokenizer = load_model(job.model)
        embedder, class_names = _build_embedder(fabric, job, model, tokenizer)
        shards, mine, left = _shards(job.source, folder, strategy, fabric)
        local_ranks = strategy.reading_ranks(fabric.world_size // job.run["config"]["num_nodes"])
        _warn_idle_workers(fabric, job, shards, resolve_num_workers(job.data.num_workers, local_ranks))
        reads = job.mode.reads_images
        decode = resolve_decode(job.data.decode, fabric.device, preprocess) if reads else PATHS["none"]
        embedder.max_batch = choose_batch_size(
            fabric,
            embedder.module,
            model,
            job.data.batch_size,
            job.mode.towers,
            decode.device_bytes_per_sample,
        )
        batches = device_batches(
            job.source, mine, preprocess, tokenizer, job.data, embedder.max_batch, fabric.device, decode,
            job.mode, local_ranks,
        )  # fmt: skip
        # What this run settled on, for the summary (the options may say auto).
        ran = {
            "decode": decode.name,
            "jpeg_library": batches.jpeg_library,
            "precision": job.run["fingerprint"]["precision"],
            "num_workers": batches.workers,
            "shard_size": getattr(job.source, "shard_size", None),
        }
        writer = ShardWriter(job.output.dir, len(shards), job.output.dtype, enabled=strategy.writes)
        # Tar shards are counted once read: rank 0's bar shows the shards done of those left instead.
        todo = len(shards) - len(folder.done_shards()) if left is None and fabric.global_rank == 0 else None
        progress = Progress(fabric.global_rank, left, "samples", strategy.writes, todo)
        job_stop = JobStop(stop, job_store())
        stopping = lambda: strategy.agree_to_stop(job_stop())  # noqa: E731
        shards_begun = lambda: writer.open_shards  # noqa: E731
        with progress, torch.inference_mode(), strategy.partner_session(embedder.module):
            for batch, outputs, latency in encode_in_order(batches, embedder, stopping, shards_begun):
                finished = job.mode.finish(batch.rows, outputs, job.threshold, class_names)
                writer.add(batch.shard, batch.source, finished, batch.errors, batch.last)
                progress.add(len(finished.rows), len(batch.errors), finished.filtered, latency, batch.last)
        writer.close()
        # The share of JPEGs the workers decoded beside the GPU decoder (rank 0's; auto sets it).
        ran["cpu_decode_share"] = batches.balance.cpu_fraction() if batches.balance else None
        return _finish(fabric, job, folder, len(shards), progress, embedder.max_batch, ran, job_stop.raised)


def _build_embedder(
    fabric: Fabric, job: Job, model: torch.nn.Module, tokenizer
) -> tuple[ChunkedEmbedder, list[str] | None]:
    """The set-up embedder of this mode's outputs; in ``zeroshot`` with its classifier, built once by all
    ranks together, and the class names."""
    from clip_fabric.encode import DEFAULT_BATCH_SIZE, ChunkedEmbedder
    from clip_fabric.model import Embedder
    from clip_fabric.strategies import hooks
    from clip_fabric.zeroshot import load_class_names, load_templates, sharded_classifier

    module = fabric.setup_module(Embedder(model, job.mode.encoder_outputs, job.zeroshot.top_k))
    embedder = ChunkedEmbedder(module, DEFAULT_BATCH_SIZE, hooks(fabric.strategy).retries_oom)
    if not job.mode.labels:
        return embedder, None

    def encode_text(tokens: torch.Tensor) -> torch.Tensor:
        with fabric.autocast():  # outside forward: autocast by hand
            return module.text_features(fabric.to_device(tokens))

    class_names = load_class_names(job.zeroshot.class_names)
    templates = load_templates(job.zeroshot.templates)
    what = f"building the zero-shot classifier ({len(class_names)} classes x {len(templates)} prompts)"
    with phase(fabric.print, what):  # minutes on a CPU: its time is start-up, not the embedding rate
        module.classifier = sharded_classifier(fabric, encode_text, tokenizer, class_names, templates)
    return embedder, class_names


def _shards(
    source: Source, folder: RunFolder, strategy, fabric: Fabric
) -> tuple[list[Shard], list[Shard], int | None]:
    """All shards of the job; those this rank computes (its split of the shards not done yet, so a
    resumed run spreads what is left over every rank, not over the ranks whose shards were lost); and
    the samples left in the whole job, where the listing knows them (tar shards are counted once read).
    Rank 0's view of the done shards is the one every rank splits: ranks reading the folder a moment
    apart could otherwise split different lists."""
    shards = source.shards()
    done = sorted(folder.done_shards()) if fabric.global_rank == 0 else None
    done = set(fabric.broadcast(done, src=0))
    todo = [s for s in shards if s.index not in done]
    split = strategy.shard_split(fabric.global_rank, fabric.world_size)
    mine = todo[split[0] :: split[1]] if split else []
    counted = all(s.stop > s.start for s in todo)
    return shards, mine, sum(s.stop - s.start for s in todo) if counted else None


def _warn_idle_workers(fabric: Fabric, job: Job, shards: list[Shard], workers: int) -> None:
    """Tar shards are read whole by one worker each: fewer tars than workers leaves workers idle."""
    if (
        fabric.global_rank == 0
        and job.data.format == "webdataset"
        and len(shards) < workers * fabric.world_size
    ):
        fabric.print(
            f"clip_fabric: {len(shards)} tar shards for {workers} workers x {fabric.world_size} ranks: each "
            "tar is read by one worker, so some stay idle; write more, smaller tars for full speed"
        )


def _finish(
    fabric: Fabric,
    job: Job,
    folder: RunFolder,
    num_shards: int,
    progress: Progress,
    batch_size: int,
    ran: dict,
    stopped: bool,
) -> dict:
    """The job's summary, written by rank 0: totals of every shard done so far and this run's figures."""
    import torch

    end = time.perf_counter()
    wall, loop = process_seconds(job.started), end - progress.started
    rate = progress.steady_rate(end)
    unmeasured = rate is None and progress.rows > 0  # ranks that wrote nothing (text, idle) do not vote
    # float64 holds row counts exactly; the steady rates of the ranks add up to the job's.
    local = torch.tensor(
        [progress.rows, progress.errors, rate or 0.0, unmeasured, float(stopped), len(progress.latencies)],
        dtype=torch.float64,
        device=fabric.device,
    )
    counts = fabric.all_reduce(local, reduce_op="sum")
    rows = int(counts[0])
    # The job took as long as its slowest rank (rank 0 may have had nothing left to do on a resume): its
    # wall time from the process's start, and its embedding loop's, which gives the rate.
    times = torch.tensor([wall, loop], dtype=torch.float64, device=fabric.device)
    seconds, loop = fabric.all_reduce(times, reduce_op="max").cpu().tolist()
    fabric.barrier()
    # Rank 0 reads the done markers (one listing, not one per rank: on a store each is a request).
    summary = (
        folder.summarize(job.run, num_shards, rows, int(counts[1]), seconds, fabric.world_size)
        | {"error_reasons": folder_reasons(folder.fs, folder.path("errors"))}
        if fabric.global_rank == 0
        else None
    )
    summary = fabric.broadcast(summary, src=0)
    first = progress.first_batch_at
    summary["this_run"] |= ran | {
        "batch_size": batch_size,
        "samples_per_s": round(rows / loop, 1) if loop > 0 else None,  # model load, classifier excluded
        "setup_s": round(seconds - loop, 3),
        "startup_s": round(first - job.started, 3) if first is not None else None,
        "batch_latency_ms": progress.latency_ms(),
        "steady_samples_per_s": round(float(counts[2]), 1) if not counts[3] else None,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(fabric.device) / 1e9, 3)
        if fabric.device.type == "cuda"
        else None,
    }
    if fabric.global_rank == 0:
        if not counts[5] and summary["shards_done"] == num_shards:  # a rerun of a finished job, no batch
            summary = _keep_last_run(folder, summary)
        folder.write_summary(summary)
        if counts[4] and summary["shards_done"] < summary["shards_total"] and not requeue_slurm_job():
            fabric.print("clip_fabric: stopped on a signal; rerun the same command to resume")
    fabric.print(final_line(summary, job.output.dir))
    return summary


def _keep_last_run(folder: RunFolder, summary: dict) -> dict:
    """The summary of a rerun that found nothing left to do: ``this_run`` stays the last run's that
    embedded something, not ``rows: 0``; ``nothing_left`` says so."""
    try:
        before = folder.read_json(SUMMARY_FILE, "the last run's summary")
    except ValueError:
        before = None
    if isinstance(before, dict) and isinstance(before.get("this_run"), dict):
        summary["this_run"] = before["this_run"]
    return summary | {"nothing_left": True}
