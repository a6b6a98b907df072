"""What each ``--mode`` computes and writes: which towers run, whether a caption is required, which
embeddings and columns are written, and how a batch's rows are finished. Every other module asks here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

ModeName = Literal["image", "text", "both", "pair", "zeroshot"]


@dataclass(frozen=True)
class Finished:
    """A batch's rows as written: metadata rows, the embeddings of the kept rows, and how many pairs
    ``--threshold`` dropped."""

    rows: list[dict]
    embeddings: dict[str, np.ndarray]
    filtered: int = 0


@dataclass(frozen=True)
class Mode:
    """One ``--mode``. ``towers`` run on every batch; a text tower needs each sample's caption, so a
    sample without one is an error in such modes and a plain row in the others."""

    name: str
    towers: frozenset[str]
    embeddings: frozenset[str]
    similarity: bool = False
    labels: bool = False

    @property
    def reads_images(self) -> bool:
        return "image" in self.towers

    @property
    def caption_required(self) -> bool:
        return "text" in self.towers

    @property
    def paired(self) -> bool:
        """Both towers run on every batch: the strategies that split the towers apply."""
        return self.towers == {"image", "text"}

    @property
    def encoder_outputs(self) -> frozenset[str]:
        """What the encoder returns per batch."""
        extra = {"similarity"} if self.similarity else set()
        return self.embeddings | extra | ({"topk", "topk_probs"} if self.labels else set())

    def check(self, threshold: float | None, splits_towers: bool, strategy: str) -> None:
        """One-line errors for options this mode cannot take, before any process starts."""
        if splits_towers and not self.paired:
            raise ValueError(
                f"--strategy {strategy} splits the two towers over devices, but --mode {self.name} runs "
                f"only the {'/'.join(sorted(self.towers))} tower per batch: use --strategy ddp, or --mode "
                "both or pair"
            )
        if threshold is not None and not self.similarity:
            raise ValueError(
                f"--threshold filters image-caption pairs: use it with --mode pair or both, not {self.name}"
            )

    def finish(
        self,
        rows: list[dict],
        outputs: dict[str, np.ndarray],
        threshold: float | None = None,
        class_names: Sequence[str] | None = None,
    ) -> Finished:
        """The rows and embeddings this mode writes for one batch's encoder ``outputs``."""
        if not rows:  # a batch of errors only, or the end of a shard: nothing was encoded
            return Finished([], {})
        rows = [read_back_columns(row) for row in rows]
        keep = None
        if self.similarity:
            scores = outputs["similarity"]
            rows = [row | {"similarity": float(s)} for row, s in zip(rows, scores, strict=True)]
            if threshold is not None:
                keep = scores >= threshold
                rows = [row for row, kept in zip(rows, keep, strict=True) if kept]
        if self.labels:
            rows = [
                row | _labels(class_names, index, probs)
                for row, index, probs in zip(rows, outputs["topk"], outputs["topk_probs"], strict=True)
            ]
        embeddings = {t: outputs[t] if keep is None else outputs[t][keep] for t in self.embeddings}
        return Finished(rows, embeddings, 0 if keep is None else int((~keep).sum()))


def read_back_columns(row: dict) -> dict:
    """The columns every output has, whatever the input format and mode, so one reader (the README's
    EmbeddingReader with ``image_path`` and ``caption``) reads them all: ``image_path`` null where the
    input has none (a caption list, synthetic images), and a missing or blank caption null, never ``''``."""
    caption = row.get("caption")
    return (
        {"key": row["key"], "image_path": row.get("image_path")}
        | row
        | {"caption": caption if isinstance(caption, str) and caption.strip() else None}
    )


def _labels(class_names: Sequence[str], index: np.ndarray, probs: np.ndarray) -> dict:
    names = [class_names[i] for i in index]
    return {
        "label": names[0],
        "probability": float(probs[0]),
        "topk_labels": names,
        "topk_probs": probs.tolist(),
    }


IMAGE, TEXT = frozenset({"image"}), frozenset({"text"})
BOTH = IMAGE | TEXT
MODES: dict[str, Mode] = {
    "image": Mode("image", towers=IMAGE, embeddings=IMAGE),
    "text": Mode("text", towers=TEXT, embeddings=TEXT),
    "both": Mode("both", towers=BOTH, embeddings=BOTH, similarity=True),
    "pair": Mode("pair", towers=BOTH, embeddings=frozenset(), similarity=True),
    # The classifier is built once from the class prompts; per batch only the image tower runs.
    "zeroshot": Mode("zeroshot", towers=IMAGE, embeddings=IMAGE, labels=True),
}
