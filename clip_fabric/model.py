"""Loading open_clip models through open_clip's own factory, and the module that turns batches into
L2-normalised embeddings."""

from __future__ import annotations

import difflib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip_fabric.config import ModelArgs

log = logging.getLogger(__name__)
HF_HUB_PREFIX = "hf-hub:"
HF_CONFIG_FILE = "open_clip_config.json"
# What open_clip loads from an hf-hub repo, safetensors first (open_clip.pretrained.HF_WEIGHTS_NAME).
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class WeightsUnavailableError(RuntimeError):
    """The pretrained weights asked for are neither cached nor downloadable."""


def register_config(args: ModelArgs) -> None:
    """Make a custom model-config JSON known to open_clip (a no-op without one)."""
    if args.config is not None:
        open_clip.add_model_config(args.config)


def check_model(args: ModelArgs) -> None:
    """Fail fast, before any process starts, on an unknown model or weights that cannot be had."""
    register_config(args)
    if args.name.startswith(HF_HUB_PREFIX):
        _check_hf_hub_model(args)
        return
    if args.name not in open_clip.list_models():
        guess = nearest_model(args.name, open_clip.list_models())
        raise ValueError(
            f"unknown open_clip model {args.name!r}: "
            + (f"did you mean --model.name {guess}? Else pick" if guess else "pick")
            + " one of open_clip.list_models() or give --model.config path/to/config.json"
        )
    if args.pretrained is None or Path(args.pretrained).is_file():
        return
    cfg = open_clip.get_pretrained_cfg(args.name, args.pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(args.name)
        raise ValueError(
            f"--model.pretrained {args.pretrained!r} is neither a file nor a tag of {args.name}; "
            f"known tags: {', '.join(tags) or 'none'}"
        )
    if not _weights_cached(cfg, args.cache_dir) and not _hub_reachable():
        raise WeightsUnavailableError(
            f"weights {args.name}/{args.pretrained} are not in the local cache and the hub cannot be "
            "reached: download them once where there is network (open_clip.create_model"
            f"('{args.name}', pretrained='{args.pretrained}')) or pass --model.pretrained /path/to/weights"
        )


def nearest_model(name: str, known: list[str]) -> str | None:
    """The open_clip name a mistyped or OpenAI-style one means: ``ViT-B/32`` (OpenAI's and
    clip-retrieval's spelling) is ``ViT-B-32``; otherwise the closest name, case aside."""
    dashed = name.replace("/", "-")
    by_lower = {k.lower(): k for k in known}
    if dashed.lower() in by_lower:
        return by_lower[dashed.lower()]
    close = difflib.get_close_matches(dashed.lower(), list(by_lower), n=1, cutoff=0.75)
    return by_lower[close[0]] if close else None


def load_model(args: ModelArgs) -> tuple[nn.Module, Callable, Callable]:
    """Return ``(model, preprocess, tokenizer)`` exactly as open_clip builds them for evaluation; an
    ``hf-hub:`` model comes with its repo's weights (``check_model`` made sure they are there)."""
    register_config(args)
    if args.pretrained is None and not args.name.startswith(HF_HUB_PREFIX):
        # Every rank must build the same random weights, or ranks would disagree on the same input.
        torch.manual_seed(0)
        log.warning(
            "NO PRETRAINED WEIGHTS: %s runs with RANDOM weights; its embeddings are meaningless. "
            "Pass --model.pretrained TAG_OR_PATH for real ones.",
            args.name,
        )
    root = logging.getLogger()
    root.addFilter(_open_clip_random_weights)  # the warning above says it once, with what to do
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            args.name, pretrained=args.pretrained, cache_dir=args.cache_dir
        )
    except Exception as err:
        if args.pretrained is None or not Path(args.pretrained).is_file():
            raise
        # A cut file, or one that is not a state dict (whatever torch or open_clip raise for it): one line.
        raise ValueError(
            f"--model.pretrained {args.pretrained} cannot be loaded as {args.name} weights "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}): give an "
            "open_clip checkpoint (a state dict, or a dict with 'state_dict') for this model"
        ) from err
    finally:
        root.removeFilter(_open_clip_random_weights)
    model.eval().requires_grad_(False)
    patch_embedding_as_matmul(model)
    # An hf-hub: tokenizer is chosen by the repo's config, which sits in the cache the weights came from.
    hub = args.name.startswith(HF_HUB_PREFIX)
    return model, preprocess, open_clip.get_tokenizer(args.name, cache_dir=args.cache_dir if hub else None)


def _open_clip_random_weights(record: logging.LogRecord) -> bool:
    """Drop open_clip's own "No pretrained weights loaded" line: ``load_model`` warns once itself."""
    return not str(record.msg).startswith("No pretrained weights loaded")


class MatmulPatchEmbedding(nn.Module):
    """A ViT's patch embedding (a convolution whose stride equals its kernel) as one matrix product.

    Patches of a stride-equals-kernel convolution do not overlap, so the convolution is a reshape of the
    image into ``[patches, channels * kernel]`` rows times the flattened kernel. cuDNN runs this shape
    (NCHW input, 32x32 or 14x14 kernel, 3 input channels) slowly, and the matmul many times faster
    (docs/benchmarks.md, 'What made the towers faster').
    The result is the convolution's, up to float rounding; it keeps the convolution's ``weight``
    Parameter (and ``bias``), so the state dict is unchanged.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight = conv.weight  # [out, in, kh, kw]: the same Parameter, not a copy
        self.bias = conv.bias
        self.kernel_size = tuple(conv.kernel_size)

    @staticmethod
    def applies_to(conv: nn.Module) -> bool:
        return (
            type(conv) is nn.Conv2d
            and tuple(conv.stride) == tuple(conv.kernel_size)
            and tuple(conv.padding) == (0, 0)
            and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1
        )

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        kh, kw = self.kernel_size
        rows, cols = height // kh, width // kw
        # A convolution without padding drops the pixels past the last whole patch.
        x = x[:, :, : rows * kh, : cols * kw]
        patches = (
            x.reshape(batch, channels, rows, kh, cols, kw)
            .permute(0, 2, 4, 1, 3, 5)  # [batch, rows, cols, channels, kh, kw]: the kernel's order
            .reshape(batch * rows * cols, channels * kh * kw)
        )
        out = F.linear(patches, self.weight.reshape(self.weight.shape[0], -1), self.bias)
        # [batch, out, rows, cols] as the convolution returns it, a view of the contiguous product.
        return out.reshape(batch, rows, cols, -1).permute(0, 3, 1, 2)


def patch_embedding_as_matmul(model: nn.Module) -> bool:
    """Replace the image tower's patch-embedding convolution (open_clip's ``visual.conv1``) with
    :class:`MatmulPatchEmbedding` where it applies; return whether it did."""
    visual = getattr(model, "visual", None)
    conv = getattr(visual, "conv1", None)
    if conv is None or not MatmulPatchEmbedding.applies_to(conv):
        return False
    visual.conv1 = MatmulPatchEmbedding(conv)
    return True


class Embedder(nn.Module):
    """Runs the towers the inputs ask for and returns the ``outputs`` asked for: float32, L2-normalised
    ``image``/``text`` embeddings and the ``similarity`` (cosine) of each image-caption pair.

    Normalising in float32 here means every precision writes unit vectors, and the cosine of two
    runs is a plain dot product.
    """

    def __init__(
        self, model: nn.Module, outputs: frozenset[str] = frozenset({"image", "text"}), top_k: int = 5
    ) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs
        self.top_k = top_k
        self.classifier: Tensor | None = None  # [classes, dim] zero-shot weights, set once before the run

    def forward(self, images: Tensor | None = None, texts: Tensor | None = None) -> dict[str, Tensor]:
        image = self.image_features(images) if images is not None else None
        text = self.text_features(texts) if texts is not None else None
        return self.combine(image, text)

    def image_features(self, images: Tensor) -> Tensor:
        return F.normalize(self.model.encode_image(images).float(), dim=-1)

    def text_features(self, texts: Tensor) -> Tensor:
        return F.normalize(self.model.encode_text(texts).float(), dim=-1)

    def combine(self, image: Tensor | None, text: Tensor | None) -> dict[str, Tensor]:
        """The outputs asked for, from the features of either tower or both."""
        out = {name: value for name, value in (("image", image), ("text", text)) if value is not None}
        if "similarity" in self.outputs:
            # Where the towers sit on two devices, they meet on the text tower's.
            out["similarity"] = (image.to(text.device) * text).sum(-1)
        if "topk" in self.outputs:
            weights = self.classifier.to(image.device)
            logits = self.model.logit_scale.exp().float().to(image.device) * image @ weights.T
            probs, index = logits.softmax(dim=-1).topk(min(self.top_k, len(weights)), dim=-1)
            out |= {"topk": index, "topk_probs": probs}
        return {name: value for name, value in out.items() if name in self.outputs}


def _check_hf_hub_model(args: ModelArgs) -> None:
    """An ``hf-hub:ORG/NAME`` model: its open_clip config and weights are in the Hugging Face cache, or
    fetched into it now, once, before any rank starts (open_clip itself would go on with random
    weights, and only log it, where the weights cannot be had)."""
    repo = args.name[len(HF_HUB_PREFIX) :]
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(
            f"--model.name {args.name!r}: hf-hub: names a Hugging Face repo as hf-hub:ORG/NAME, "
            "e.g. hf-hub:timm/ViT-B-16-SigLIP"
        )
    if args.pretrained is not None:
        raise ValueError(
            f"--model.pretrained {args.pretrained!r}: an hf-hub: model's weights are its repo's; "
            "leave --model.pretrained out"
        )
    missing = [name for name in ("config", "weights") if not _hf_file_cached(repo, name, args.cache_dir)]
    if not missing:
        return
    if not _hub_reachable():
        from huggingface_hub import constants

        where = args.cache_dir or f"the Hugging Face cache {constants.HF_HUB_CACHE} (HF_HOME, HF_HUB_CACHE)"
        raise WeightsUnavailableError(
            f"{args.name}: its open_clip {' and '.join(missing)} are not in {where}, and the hub cannot "
            f"be reached (HF_HUB_OFFLINE or no network): fetch it once where there is network with "
            f"python -c \"import open_clip; open_clip.create_model_and_transforms('{args.name}')\" "
            "and the same cache, or pass --model.cache_dir where a copy of that cache is"
        )
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        download_pretrained_from_hf(repo, filename=HF_CONFIG_FILE, cache_dir=args.cache_dir)
        download_pretrained_from_hf(repo, cache_dir=args.cache_dir)
    except Exception as err:  # noqa: BLE001 - whatever the hub client raises, the run cannot start
        raise WeightsUnavailableError(
            f"{args.name}: the hub has no open_clip model there ({' '.join(str(err).split())[:300]}); "
            "check the repo name (its files must include open_clip_config.json and weights)"
        ) from None


def hf_hub_revision(args: ModelArgs) -> str | None:
    """The commit of the cached snapshot an ``hf-hub:`` model's weights load from (None for other
    models): a repo can change under the same name, and a resumed run must not mix its two versions."""
    if not args.name.startswith(HF_HUB_PREFIX):
        return None
    from huggingface_hub import try_to_load_from_cache

    repo = args.name[len(HF_HUB_PREFIX) :]
    for name in HF_WEIGHT_FILES:
        found = try_to_load_from_cache(repo, name, cache_dir=args.cache_dir)
        if isinstance(found, str) and "snapshots" in Path(found).parts:
            parts = Path(found).parts
            return parts[parts.index("snapshots") + 1]
    return None


def _hf_file_cached(repo: str, what: str, cache_dir: str | None) -> bool:
    """Whether the repo's open_clip config, or its weights (safetensors or .bin), are in the cache."""
    from huggingface_hub import try_to_load_from_cache

    names = (HF_CONFIG_FILE,) if what == "config" else HF_WEIGHT_FILES
    return any(isinstance(try_to_load_from_cache(repo, n, cache_dir=cache_dir), str) for n in names)


def _weights_cached(cfg: dict, cache_dir: str | None) -> bool:
    if "file" in cfg:
        return Path(cfg["file"]).is_file()
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(cfg["hf_hub"])
        found = try_to_load_from_cache(
            repo_id, filename or "open_clip_pytorch_model.bin", cache_dir=cache_dir
        )
        return isinstance(found, str)
    if cfg.get("url"):
        root = Path(cache_dir or Path.home() / ".cache" / "clip")
        return (root / os.path.basename(cfg["url"])).is_file()
    return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One short connection attempt instead of the hub client's long retry loop."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False
