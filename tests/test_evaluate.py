"""The evaluate command against metrics computed here with numpy from plain open_clip embeddings, on one
process (in this one) and two (gloo, real processes), plus refusals of bad input before any work."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from conftest import REPO, jpeg_bytes, write_tar
from PIL import Image

from clip_fabric.config import DataArgs, ModelArgs
from clip_fabric.evaluate import setup
from clip_fabric.zeroshot import load_templates

CLASSES = ["apple", "bicycle", "cloud", "dog", "lamp", "river"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}"]


def evaluate_cli(*args: str) -> dict:
    """``python -m clip_fabric evaluate ARGS`` in fresh processes, as a user runs it; returns the report."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "clip_fabric", "evaluate", "--accelerator", "cpu", *args]
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "report written to" in result.stdout
    return json.loads(open(args[args.index("--output") + 1]).read())


def reference_model(config, checkpoint):
    open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(checkpoint))
    return model.eval(), preprocess, open_clip.get_tokenizer("tiny-clip")


def embed(model, preprocess, tokenizer, images: list[bytes] = (), texts: list[str] = ()) -> np.ndarray:
    with torch.no_grad():
        if images:
            feats = model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in images]))
        else:
            feats = model.encode_text(tokenizer(list(texts)))
    feats = feats.double().numpy()
    return feats / np.linalg.norm(feats, axis=-1, keepdims=True)


def reference_logits(config, checkpoint, images: list[bytes], names, templates) -> np.ndarray:
    """Image embeddings against each class's mean prompt embedding (renormalised), as in CLIP's paper."""
    model, preprocess, tokenizer = reference_model(config, checkpoint)
    weights = []
    for name in names:
        per_template = embed(model, preprocess, tokenizer, texts=[t.format(name) for t in templates])
        mean = per_template.mean(0)
        weights.append(mean / np.linalg.norm(mean))
    return embed(model, preprocess, tokenizer, images=images) @ np.stack(weights).T


def reference_zeroshot(config, checkpoint, images: list[bytes], labels: list[int], names, templates) -> dict:
    logits = reference_logits(config, checkpoint, images, names, templates)
    own = logits[np.arange(len(labels)), labels]
    rank = (logits > own[:, None]).sum(1)
    return {"top1": float(np.mean(rank < 1)), "top5": float(np.mean(rank < 5))}


def reference_retrieval(config, checkpoint, images: list[bytes], captions: list[str]) -> dict:
    model, preprocess, tokenizer = reference_model(config, checkpoint)
    scores = (
        embed(model, preprocess, tokenizer, images=images)
        @ embed(model, preprocess, tokenizer, texts=captions).T
    )
    out = {}
    for direction, s in (("image_to_text", scores), ("text_to_image", scores.T)):
        rank = (s > np.diag(s)[:, None]).sum(1)
        out |= {f"{direction}_R@{k}": float(np.mean(rank < k)) for k in (1, 5, 10)}
    return out


@pytest.fixture
def class_folder(tmp_path):
    """6 images, one in each of 6 class sub-folders."""
    root = tmp_path / "classes"
    for i, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        (root / name / f"img{i:02d}.jpg").write_bytes(jpeg_bytes(100 + i, (48, 40)))
    return root


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("\n".join(TEMPLATES) + "\n")
    return path


@pytest.mark.parametrize(("strategy", "devices"), [("auto", 1), ("model_parallel", 2)])
def test_zeroshot_folder_one_process_matches_numpy(
    tmp_path, tiny_config, tiny_checkpoint, template_file, strategy, devices
):
    # Random weights score near chance; so that a wrong label or class order shows, image i goes into the
    # folder of the class at place i % 6 of its reference ranking: 3 of 18 top-1 hits, 15 top-5 hits.
    images = [jpeg_bytes(300 + i, (48, 40)) for i in range(18)]
    order = np.argsort(-reference_logits(tiny_config, tiny_checkpoint, images, CLASSES, TEMPLATES), axis=1)
    labels = [int(order[i, i % 6]) for i in range(18)]
    assert set(labels) == set(range(6)), "every class needs a sub-folder: pick other image seeds"
    root = tmp_path / "classes"
    for i, (data, label) in enumerate(zip(images, labels, strict=True)):
        (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        (root / CLASSES[label] / f"img{i:02d}.jpg").write_bytes(data)

    report = setup(
        model=ModelArgs(config=str(tiny_config), pretrained=str(tiny_checkpoint)),
        data=DataArgs(format="folder", source=str(root), batch_size=4, shard_size=5, num_workers=0),
        task="zeroshot",
        templates=str(template_file),
        output=str(tmp_path / "eval.json"),
        accelerator="cpu",
        strategy=strategy,
        devices=devices,
    )

    expected = reference_zeroshot(tiny_config, tiny_checkpoint, images, labels, CLASSES, TEMPLATES)
    assert expected == pytest.approx({"top1": 3 / 18, "top5": 15 / 18})
    assert report["metrics"] == pytest.approx(expected, abs=1e-6)
    assert report["counts"] == {"samples": 18, "skipped": 0, "classes": 6}
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"] == report["metrics"]
    assert report["world_size"] == 1 and report["precision"] == "32-true" and report["strategy"] == strategy


@pytest.mark.slow
def test_zeroshot_webdataset_two_processes_matches_numpy(
    tmp_path, tiny_config, tiny_checkpoint, template_file
):
    # Random weights score near chance; so that a wrong label or class order shows, each label is picked
    # to sit at a planned place in the reference ranking: first (a top-1 hit), third (top-5 only) or last.
    images = [jpeg_bytes(200 + i, (40, 40)) for i in range(11)]
    order = np.argsort(-reference_logits(tiny_config, tiny_checkpoint, images, CLASSES, TEMPLATES), axis=1)
    labels = [int(order[i, (0, 2, 5)[i % 3]]) for i in range(11)]
    index = 0
    for shard, count in enumerate((7, 4)):
        samples = []
        for _ in range(count):
            samples.append(
                {"__key__": f"k{index:04d}", "jpg": images[index], "cls": str(labels[index]).encode()}
            )
            index += 1
        if shard == 0:
            samples.append({"__key__": "broken", "jpg": b"not an image", "cls": b"0"})
        write_tar(tmp_path / f"cls-{shard}.tar", samples)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(CLASSES) + "\n")

    report = evaluate_cli(
        "--devices", "2", "--task", "zeroshot", "--model.config", str(tiny_config),
        "--model.pretrained", str(tiny_checkpoint), "--data.format", "webdataset",
        "--data.source", str(tmp_path / "cls-{0..1}.tar"), "--data.batch_size", "3",
        "--data.num_workers", "1", "--class_names", str(names), "--templates", str(template_file),
        "--output", str(tmp_path / "two.json"),
    )  # fmt: skip

    expected = reference_zeroshot(tiny_config, tiny_checkpoint, images, labels, CLASSES, TEMPLATES)
    assert expected == pytest.approx({"top1": 4 / 11, "top5": 8 / 11})
    assert report["metrics"] == pytest.approx(expected, abs=1e-6)
    assert report["counts"] == {"samples": 11, "skipped": 1, "classes": 6}
    assert report["world_size"] == 2


@pytest.mark.slow
def test_retrieval_one_and_two_processes_match_numpy(tmp_path, tiny_config, tiny_checkpoint, wds_shards):
    import tarfile

    images, captions = [], []
    for path in wds_shards:
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(members):
            if name.endswith(".jpg"):
                images.append(members[name])
                captions.append(members[name[:-4] + ".txt"].decode())
    expected = reference_retrieval(tiny_config, tiny_checkpoint, images, captions)
    source = str(tmp_path / "shard-{000000..000002}.tar")

    one = setup(
        model=ModelArgs(config=str(tiny_config), pretrained=str(tiny_checkpoint)),
        data=DataArgs(format="webdataset", source=source, batch_size=2, num_workers=0),
        task="retrieval",
        output=str(tmp_path / "one.json"),
        accelerator="cpu",
    )
    # Two ranks hold 8 and 4 pairs: uneven, so the gathered candidates are padded and cut.
    two = evaluate_cli(
        "--devices", "2", "--task", "retrieval", "--model.config", str(tiny_config),
        "--model.pretrained", str(tiny_checkpoint), "--data.format", "webdataset", "--data.source", source,
        "--data.batch_size", "2", "--data.num_workers", "0", "--output", str(tmp_path / "two.json"),
    )  # fmt: skip

    for report, world in ((one, 1), (two, 2)):
        assert report["metrics"] == pytest.approx(expected, abs=1e-6)
        assert report["counts"] == {"samples": 12, "skipped": 0} and report["world_size"] == world


def test_builtin_templates_are_open_clips():
    assert [t("dog") for t in load_templates("simple")] == [
        t("dog") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES
    ]
    assert len(load_templates("openai")) == 80


def _setup(tmp_path, tiny_config, data: DataArgs, **kw):
    return setup(
        model=ModelArgs(config=str(tiny_config)),
        data=data,
        output=str(tmp_path / "e.json"),
        accelerator="cpu",
        **kw,
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("synthetic", "--task zeroshot needs labelled data"),
        ("top_level_image", "are not in a class sub-folder"),
        ("names_count", "has 2 names but --data.source has 6 class sub-folders"),
        ("template_braces", "each template needs exactly one {}"),
        ("wds_without_names", "--task zeroshot on webdataset needs --class_names"),
        ("hybrid", "--strategy hybrid is not supported by evaluate"),
        ("names_for_retrieval", "--class_names is for --task zeroshot"),
    ],
)
def test_bad_input_is_refused_before_work(tmp_path, tiny_config, class_folder, wds_shards, case, message):
    root = class_folder
    folder = DataArgs(format="folder", source=str(root), num_workers=0)
    kw: dict = {}
    data = folder
    if case == "synthetic":
        data = DataArgs(num_samples=4)
    elif case == "top_level_image":
        (root / "loose.jpg").write_bytes(jpeg_bytes(0, (32, 32)))
    elif case == "names_count":
        (tmp_path / "names.txt").write_text("a\nb\n")
        kw["class_names"] = str(tmp_path / "names.txt")
    elif case == "template_braces":
        (tmp_path / "t.txt").write_text("a photo of a {}\na photo without a slot\n")
        kw["templates"] = str(tmp_path / "t.txt")
    elif case == "wds_without_names":
        data = DataArgs(format="webdataset", source=str(wds_shards[0]), num_workers=0)
    elif case == "hybrid":
        kw["strategy"] = "hybrid"
    elif case == "names_for_retrieval":
        kw |= {"task": "retrieval", "class_names": "imagenet"}

    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        _setup(tmp_path, tiny_config, data, **kw)
    assert not (tmp_path / "e.json").exists()


def test_label_out_of_range_names_the_sample(tmp_path, tiny_config):
    write_tar(tmp_path / "bad.tar", [{"__key__": "x1", "jpg": jpeg_bytes(1, (32, 32)), "cls": b"7"}])
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    data = DataArgs(format="webdataset", source=str(tmp_path / "bad.tar"), num_workers=0)
    with pytest.raises(ValueError, match=r"sample x1: cls '7' is not a class index in 0..1"):
        _setup(tmp_path, tiny_config, data, class_names=str(names), templates="simple")


def test_nothing_readable_is_an_error_not_a_zero(tmp_path, tiny_config):
    write_tar(tmp_path / "broken.tar", [{"__key__": "x1", "jpg": b"not an image", "txt": b"a caption"}])
    data = DataArgs(format="webdataset", source=str(tmp_path / "broken.tar"), num_workers=0)
    with pytest.raises(ValueError, match=r"no sample of --data.source could be read \(1 skipped\)"):
        _setup(tmp_path, tiny_config, data, task="retrieval")


def test_every_task_of_the_cli_is_in_the_registry():
    """--task's choices (a Literal, for the CLI) and the task registry name the same tasks, and each reads
    the batches of a predict mode."""
    import typing

    from clip_fabric.evaluate import TASKS, Task
    from clip_fabric.modes import MODES

    assert typing.get_args(Task) == tuple(TASKS)
    assert all(spec.mode in MODES for spec in TASKS.values())
    assert [name for name, spec in TASKS.items() if spec.labelled] == ["zeroshot"]
