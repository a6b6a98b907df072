"""Zero-shot classification: class names, prompt templates, and the classifier built from their text
embeddings (one L2-normalised row per class: the mean of its prompts' embeddings, renormalised)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch import Tensor

Template = Callable[[str], str]

BUILTIN_CLASS_NAMES: dict[str, Sequence[str]] = {"imagenet": open_clip.IMAGENET_CLASSNAMES}
BUILTIN_TEMPLATES: dict[str, Sequence[Template]] = {
    "openai": open_clip.OPENAI_IMAGENET_TEMPLATES,
    "simple": open_clip.SIMPLE_IMAGENET_TEMPLATES,
}


def load_class_names(spec: str, option: str = "--zeroshot.class_names") -> list[str]:
    """``imagenet`` (open_clip's 1000 names, in the sorted-synset order of ImageNet folders) or a text
    file of one class name per line, in label order. ``option``: the command's name for ``spec``, for
    the errors."""
    if spec in BUILTIN_CLASS_NAMES:
        return list(BUILTIN_CLASS_NAMES[spec])
    names = [line.strip() for line in _read_lines(spec, option, BUILTIN_CLASS_NAMES)]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{option} {spec}: class names must be distinct; repeated: {', '.join(twice)}")
    return names


def load_templates(spec: str, option: str = "--zeroshot.templates") -> list[Template]:
    """``openai`` (80 prompts), ``simple`` (7) or a text file of one prompt per line with ``{}`` where the
    class name goes. ``option``: the command's name for ``spec``, for the errors."""
    if spec in BUILTIN_TEMPLATES:
        return list(BUILTIN_TEMPLATES[spec])
    lines = _read_lines(spec, option, BUILTIN_TEMPLATES)
    for number, line in enumerate(lines, 1):
        rest = line.replace("{}", "", 1)
        if "{}" not in line or "{" in rest or "}" in rest:  # str.format would fail or drop the name
            raise ValueError(
                f"{option} {spec} line {number} {line!r}: each template needs exactly one {{}} where the "
                "class name goes, and no other braces"
            )
    return [line.format for line in lines]


def prompts(class_names: Sequence[str], templates: Sequence[Template]) -> list[str]:
    """Every template of every class, class-major: prompt ``c * len(templates) + t``."""
    return [template(name) for name in class_names for template in templates]


@torch.inference_mode()
def build_classifier(
    encode_text: Callable[[Tensor], Tensor],
    tokenizer: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[Template],
    batch_size: int = 256,
) -> Tensor:
    """The ``[classes, dim]`` float32 zero-shot weights; image logits are ``image_embeddings @ weights.T``.

    ``encode_text(tokens)`` returns L2-normalised text embeddings. Prompts are encoded in chunks of
    ``batch_size`` so that 1000 classes x 80 templates need no more memory than one batch.
    """
    if not class_names or not templates:
        raise ValueError("a zero-shot classifier needs at least one class name and one template")
    texts = prompts(class_names, templates)
    chunks = [
        encode_text(tokenizer(texts[i : i + batch_size])).float() for i in range(0, len(texts), batch_size)
    ]
    per_prompt = F.normalize(
        torch.cat(chunks), dim=-1
    )  # normalised again: the mean must weigh prompts equally
    per_class = per_prompt.view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def _read_lines(spec: str, option: str, builtins: dict) -> list[str]:
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"{option} {spec!r} is neither one of {', '.join(builtins)} nor an existing text file"
        )
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{option} {spec}: the file has no non-empty line")
    return lines


def sharded_classifier(
    fabric: Fabric,
    encode_text: Callable[[Tensor], Tensor],
    tokenizer: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[Template],
    batch_size: int = 256,
) -> Tensor:
    """``build_classifier`` computed once per run by all ranks together: each rank encodes the prompts
    of an equal slice of the classes and the slices are all-gathered, so N ranks share the
    classes x templates prompts (80,000 for ImageNet with the OpenAI templates)."""
    per_rank = -(-len(class_names) // fabric.world_size)
    mine = list(class_names[fabric.global_rank * per_rank :][:per_rank])
    mine += list(class_names[:1]) * (per_rank - len(mine))  # equal shapes for all_gather; trimmed below
    local = build_classifier(encode_text, tokenizer, mine, templates, batch_size)
    gathered = fabric.all_gather(local.contiguous()) if fabric.world_size > 1 else local
    return gathered.reshape(-1, local.shape[-1])[: len(class_names)]
