"""Option groups of the commands: small, torch-free dataclasses validated on construction.

jsonargparse turns each field into a dotted option (``--model.name``) and each field docstring into its
help text, so validation here runs before any process group, model or file is touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DataFormat = Literal["folder", "files", "webdataset", "synthetic"]
Decode = Literal["auto", "gpu", "cpu", "pil"]
Mode = Literal["image", "text", "both", "pair", "zeroshot"]


@dataclass
class ModelArgs:
    """Which open_clip model to run and where its weights come from."""

    name: str = "ViT-B-32"
    """open_clip model name (``python -c "import open_clip; print(open_clip.list_models())"``)."""
    pretrained: str | None = None
    """open_clip pretrained tag (e.g. ``openai``, ``laion2b_s34b_b79k``), a local ``.pt``/``.bin``/
    ``.safetensors`` checkpoint, or null for random weights."""
    config: str | None = None
    """Path to a custom open_clip model-config JSON; it is registered under its file stem, which
    becomes the model name unless ``name`` already equals it."""
    cache_dir: str | None = None
    """Where open_clip keeps downloaded weights (default: the Hugging Face / open_clip cache)."""

    def __post_init__(self) -> None:
        if self.config is not None:
            path = Path(self.config)
            if path.suffix != ".json" or not path.is_file():
                raise ValueError(f"--model.config {self.config!r} is not an existing .json file")
            self.name = path.stem
        if self.pretrained is not None and _looks_like_path(self.pretrained):
            if not Path(self.pretrained).is_file():
                raise ValueError(
                    f"--model.pretrained {self.pretrained!r} looks like a path but no such file exists; "
                    "give an existing checkpoint file or an open_clip tag"
                )


@dataclass
class DataArgs:
    """Where the samples come from and how they are batched."""

    format: DataFormat = "synthetic"
    """Input kind: ``folder`` (images, captions in same-stem .txt), ``files`` (CSV/TSV/parquet/txt list),
    ``webdataset`` (tar shards) or ``synthetic`` (generated images, for smoke tests and benchmarks)."""
    source: str | None = None
    """Folder path, list file, or webdataset path / brace pattern / URL. ``pipe:CMD`` runs ``CMD`` in a
    shell and reads the tar from its output: only where written here, never for names found by listing
    a folder or read from a list. Unused for synthetic."""
    batch_size: int | Literal["auto"] = "auto"
    """Samples per forward pass, or ``auto``: the largest power of two up to 1024 that fits the GPU's free
    memory, measured with one probe batch (256 on the CPU)."""
    decode: Decode = "auto"
    """Where images are decoded: ``cpu`` (DataLoader workers; resize on uint8 tensors, within 1e-5 cosine
    of open_clip), ``pil`` (open_clip's own PIL preprocess: the reference), ``gpu`` (JPEGs decoded and
    resized in batches on the GPU: by nvImageCodec on the hardware JPEG engines with the ``gpu-jpeg``
    extra, else torchvision's nvJPEG; other formats on the CPU) or ``auto``: ``gpu`` on H100/H200 with
    the ``gpu-jpeg`` extra (where it was measured), ``cpu`` elsewhere. docs/benchmarks.md: the speed and
    closeness of each."""
    dct_scaling: bool = False
    """``cpu`` decoding: decode JPEGs of at least twice the model's input size at 1/2, 1/4 or 1/8 scale
    (libjpeg's DCT scaling): faster on large photos, a little further from open_clip (docs/benchmarks.md,
    'How close the paths are')."""
    cpu_decode_share: float | Literal["auto"] = "auto"
    """With ``gpu`` decoding: the share of JPEGs the DataLoader workers decode anyway, so that their CPU
    cores add to the GPU decoder; ``auto`` sets it while the run goes, from the times of the workers and
    of the device stage (``data/balance.py``). A number fixes it (the same JPEGs on every run)."""
    num_workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes per rank that read and decode samples, or ``auto``: the CPUs the rank
    may use less one (``SLURM_CPUS_PER_TASK``, else the process's CPU affinity shared among the ranks of
    the node), at most 32."""
    shard_size: int | Literal["auto"] = "auto"
    """Samples per input shard for ``folder``, ``files`` and ``synthetic``: the unit of work split across
    ranks and workers, written as one output file and skipped on resume once complete. ``auto``: about
    1,024 shards, each of 1,024 to 10,000 samples, by the number of samples alone."""
    image_column: str | None = None
    """File-list column with the image path or URL (default: the first of image_path, path, filepath,
    url, image). A relative path is read against the list's folder, not the working directory."""
    caption_column: str | None = None
    """File-list column with the caption (default: the first of caption, text, title, if any)."""
    image_key: str | None = None
    """``webdataset``: the extension of the tar member holding the image (clip-retrieval's
    ``wds_image_key``), e.g. ``webp`` or ``seg.png``; default: the first of jpg, jpeg, png, webp, bmp,
    gif, tif, tiff in the sample."""
    caption_key: str | None = None
    """``webdataset``: the extension of the tar member holding the caption (clip-retrieval's
    ``wds_caption_key``); default: the first of txt, caption, text in the sample."""
    json_metadata: bool = True
    """Add each sample's ``.json`` fields to the metadata columns (clip-retrieval's
    ``--enable_metadata``): a webdataset member, or a same-stem file beside a folder's image. Values are
    strings (JSON text for numbers), nested keys flattened as ``a.b``."""
    num_samples: int = 1024
    """Number of samples for ``synthetic``."""
    image_size: tuple[int, int] = (500, 375)
    """Width and height of ``synthetic`` images before preprocessing."""
    max_image_pixels: int | None = 89_478_485
    """Images with more pixels are skipped as possible decompression bombs (PIL's default limit);
    null lifts the limit."""
    max_image_bytes: int | None = 256 << 20
    """The most bytes read for one image or its caption or ``.json`` (a local file, ``file://`` or an
    ``http(s)://`` URL): a larger one is skipped and recorded, so that ``/dev/zero`` or an endless HTTP
    body cannot fill a worker's memory. Default 256 MiB; null lifts the limit."""

    def __post_init__(self) -> None:
        if self.batch_size != "auto" and self.batch_size < 1:
            raise ValueError(f"--data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers != "auto" and self.num_workers < 0:
            raise ValueError(f"--data.num_workers must be >= 0 or auto, got {self.num_workers}")
        if self.shard_size != "auto" and self.shard_size < 1:
            raise ValueError(f"--data.shard_size must be >= 1, got {self.shard_size}")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ValueError(f"--data.max_image_pixels must be >= 1 or null, got {self.max_image_pixels}")
        if self.max_image_bytes is not None and self.max_image_bytes < 1:
            raise ValueError(f"--data.max_image_bytes must be >= 1 or null, got {self.max_image_bytes}")
        if self.cpu_decode_share != "auto" and not 0.0 <= self.cpu_decode_share <= 1.0:
            raise ValueError(f"--data.cpu_decode_share must be within [0, 1], got {self.cpu_decode_share}")
        if self.num_samples < 0:
            raise ValueError(f"--data.num_samples must be >= 0, got {self.num_samples}")
        for option in ("image_key", "caption_key"):
            value = getattr(self, option)
            if value is not None:
                if self.format != "webdataset":
                    raise ValueError(
                        f"--data.{option} names a tar member: it is for --data.format webdataset, "
                        f"not {self.format}"
                    )
                setattr(self, option, value.lstrip(".").lower())  # tar members are matched lowercased
                if not getattr(self, option):
                    raise ValueError(f"--data.{option} {value!r} is empty: give an extension such as jpg")
        if self.format == "synthetic":
            if self.source:
                raise ValueError(
                    f"--data.source {self.source!r} is given but --data.format is synthetic; "
                    "set --data.format"
                )
            return
        if not self.source:
            raise ValueError(f"--data.source is required for --data.format {self.format}")
        if self.format in ("folder", "files") and not _is_url(self.source):
            path = Path(self.source)
            if self.format == "folder" and not path.is_dir():
                raise ValueError(f"--data.source {self.source!r} is not a folder (--data.format folder)")
            if self.format == "files" and path.is_dir():
                raise ValueError(
                    f"--data.source {self.source!r} is a folder: use --data.format folder for a folder of "
                    "images (clip-retrieval's input_format files); --data.format files reads a list file"
                )
            if self.format == "files" and not path.is_file():
                raise ValueError(f"--data.source {self.source!r} is not a file (--data.format files)")


@dataclass
class ZeroShotArgs:
    """Zero-shot classification (``--mode zeroshot``): classes, prompts, and how many labels to keep."""

    class_names: str = "imagenet"
    """``imagenet`` (open_clip's 1000 names) or a text file with one class name per line."""
    templates: str = "openai"
    """``openai`` (80 prompts), ``simple`` (7) or a text file, one prompt per line, ``{}`` for the name."""
    top_k: int = 5
    """Labels and probabilities written per image, best first."""

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"--zeroshot.top_k must be >= 1, got {self.top_k}")


@dataclass
class OutputArgs:
    """Where and how the embeddings are written."""

    dir: str = "out"
    """Output folder or fsspec URL (``file://``, ``s3://`` with s3fs, ``gs://`` with gcsfs), laid out as
    clip-retrieval's (img_emb/, text_emb/, metadata/)."""
    dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of the L2-normalised embeddings."""
    overwrite: bool = False
    """Start again in an output folder that holds a run with a different configuration."""

    def __post_init__(self) -> None:
        if "://" in self.dir and not self.dir.startswith("file://"):
            return  # a store: its "folders" are key prefixes
        path = Path(self.dir.removeprefix("file://"))
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            where = "is a file" if existing == path else f"is inside {str(existing)!r}, a file"
            raise ValueError(
                f"--output.dir {self.dir!r} {where}, not a folder: give a folder path (created if missing)"
            )


def _is_url(source: str) -> bool:
    return "://" in source or source.startswith("pipe:")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))
