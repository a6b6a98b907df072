"""Every mode on every input kind, with and without captions: ``image`` and ``zeroshot`` embed every
readable image, ``text`` every caption, ``both``/``pair`` record uncaptioned samples as errors; on one
process and on two gloo ranks. And the mode table itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import SIZES, jpeg_bytes, run_cli, write_tar

from clip_fabric.config import DataArgs, ModelArgs, OutputArgs, ZeroShotArgs
from clip_fabric.modes import MODES
from clip_fabric.predict import setup

COUNT = 6
CAPTIONED = {i for i in range(COUNT) if i % 2 == 0}
CLASSES = ["cat", "dog", "tree"]
# (rows written, samples recorded as errors) per mode, for COUNT samples of which CAPTIONED have one.
EXPECTED = {
    "image": (COUNT, 0),
    "zeroshot": (COUNT, 0),
    "text": (len(CAPTIONED), COUNT - len(CAPTIONED)),
    "both": (len(CAPTIONED), COUNT - len(CAPTIONED)),
    "pair": (len(CAPTIONED), COUNT - len(CAPTIONED)),
}
TOWER_DIRS = {
    "image": {"img_emb"},
    "zeroshot": {"img_emb"},
    "text": {"text_emb"},
    "both": {"img_emb", "text_emb"},
}


def make_input(kind: str, root: Path) -> tuple[str, list[str]]:
    """A source of COUNT images of which the even ones have captions; its ``--data.source`` and the key
    each sample gets."""
    images = [jpeg_bytes(i, SIZES[i % len(SIZES)]) for i in range(COUNT)]
    caption = lambda i: f"a photo of thing {i}"  # noqa: E731
    if kind == "folder":
        root.mkdir()
        for i, data in enumerate(images):
            (root / f"img{i}.jpg").write_bytes(data)
            if i in CAPTIONED:
                (root / f"img{i}.txt").write_text(caption(i))
        return str(root), [f"img{i}.jpg" for i in range(COUNT)]
    if kind == "files":
        root.mkdir()
        for i, data in enumerate(images):
            (root / f"img{i}.jpg").write_bytes(data)
        rows = [
            {"image_path": f"img{i}.jpg", "caption": caption(i) if i in CAPTIONED else ""}
            for i in range(COUNT)
        ]
        pd.DataFrame(rows).to_csv(root / "list.csv", index=False)
        return str(root / "list.csv"), None  # keys are row numbers: read back from the output
    root.mkdir()
    samples = [
        {"__key__": f"s{i:03d}", "jpg": data} | ({"txt": caption(i).encode()} if i in CAPTIONED else {})
        for i, data in enumerate(images)
    ]
    write_tar(root / "shard-0.tar", samples[:4])
    write_tar(root / "shard-1.tar", samples[4:])
    return str(root / "shard-{0..1}.tar"), [f"s{i:03d}" for i in range(COUNT)]


def read_back(out: Path, mode: str) -> tuple[list[dict], list[dict]]:
    """The metadata rows and error records of an output folder, checked against its embedding files."""
    rows, errors = [], []
    for meta in sorted((out / "metadata").glob("*.parquet")):
        table = pq.read_table(meta).to_pylist()
        name = meta.stem.split("_")[-1]
        for sub in TOWER_DIRS.get(mode, set()):
            assert len(np.load(out / sub / f"{sub}_{name}.npy")) == len(table)
        rows += table
    for path in sorted((out / "errors").glob("*.parquet")):
        errors += pq.read_table(path).to_pylist()
    return rows, errors


def check(out: Path, mode: str, keys: list[str] | None) -> None:
    rows, errors = read_back(out, mode)
    expected_rows, expected_errors = EXPECTED[mode]
    assert (len(rows), len(errors)) == (expected_rows, expected_errors), (rows, errors)
    if keys is not None:
        wanted = keys if expected_rows == COUNT else [keys[i] for i in sorted(CAPTIONED)]
        assert sorted(r["key"] for r in rows) == sorted(wanted)
        assert sorted(e["key"] for e in errors) == sorted(set(keys) - set(wanted))
    assert all("caption" in e["reason"] for e in errors)
    if mode == "zeroshot":
        assert all(r["label"] in CLASSES and r["topk_labels"][0] == r["label"] for r in rows)
    if MODES[mode].similarity:
        assert all(-1 <= r["similarity"] <= 1 for r in rows)


@pytest.mark.parametrize("kind", ["folder", "files", "webdataset"])
@pytest.mark.parametrize("mode", list(EXPECTED))
def test_every_mode_on_every_input_one_process(tmp_path, tiny_config, kind, mode):
    source, keys = make_input(kind, tmp_path / "in")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES))
    setup(
        model=ModelArgs(config=str(tiny_config)),
        data=DataArgs(format=kind, source=source, batch_size=4, shard_size=4, num_workers=0),
        output=OutputArgs(dir=str(tmp_path / "out")),
        mode=mode,
        accelerator="cpu",
        zeroshot=ZeroShotArgs(class_names=str(classes), templates="simple", top_k=2),
    )
    check(tmp_path / "out", mode, keys)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, kind", [("image", "files"), ("zeroshot", "folder"), ("text", "webdataset"), ("both", "folder"),
                   ("pair", "webdataset")],
)  # fmt: skip
def test_every_mode_on_two_gloo_ranks(tmp_path, tiny_config, mode, kind):
    source, keys = make_input(kind, tmp_path / "in")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES))
    result = run_cli(
        "predict", "--accelerator", "cpu", "--devices", "2", "--mode", mode,
        "--model.config", str(tiny_config),
        "--data.format", kind, "--data.source", source, "--data.shard_size", "2", "--data.batch_size", "2",
        "--data.num_workers", "1", "--output.dir", str(tmp_path / "out"),
        "--zeroshot.class_names", str(classes), "--zeroshot.templates", "simple", "--zeroshot.top_k", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    check(tmp_path / "out", mode, keys)


def test_mode_table():
    assert {n for n, m in MODES.items() if m.caption_required} == {"text", "both", "pair"}
    assert {n for n, m in MODES.items() if m.paired} == {"both", "pair"}
    assert not MODES["text"].reads_images and MODES["zeroshot"].reads_images
    assert MODES["zeroshot"].encoder_outputs == {"image", "topk", "topk_probs"}
    assert MODES["pair"].encoder_outputs == {"similarity"} and not MODES["pair"].embeddings


def test_mode_checks_name_the_fix():
    with pytest.raises(ValueError, match="--strategy hybrid splits the two towers.*--mode zeroshot"):
        MODES["zeroshot"].check(None, splits_towers=True, strategy="hybrid")
    with pytest.raises(ValueError, match="--threshold filters image-caption pairs"):
        MODES["image"].check(0.2, splits_towers=False, strategy="ddp")
    MODES["pair"].check(0.2, splits_towers=True, strategy="hybrid")


def test_finish_scores_filters_and_labels():
    rows = [{"key": str(i)} for i in range(3)]
    image = np.eye(3, dtype=np.float32)
    out = MODES["both"].finish(
        rows, {"image": image, "text": image, "similarity": np.array([0.9, 0.1, 0.5])}, 0.4
    )
    assert [r["key"] for r in out.rows] == ["0", "2"] and out.filtered == 1
    assert [r["similarity"] for r in out.rows] == pytest.approx([0.9, 0.5])
    assert np.array_equal(out.embeddings["image"], image[[0, 2]])
    labelled = MODES["zeroshot"].finish(
        rows, {"image": image, "topk": np.array([[1, 0]] * 3), "topk_probs": np.array([[0.75, 0.25]] * 3)},
        class_names=["cat", "dog"],
    )  # fmt: skip
    assert labelled.rows[0] == {"key": "0", "image_path": None, "caption": None, "label": "dog",
                                "probability": 0.75, "topk_labels": ["dog", "cat"],
                                "topk_probs": [0.75, 0.25]}  # fmt: skip
    assert MODES["pair"].finish([], {}).rows == []
