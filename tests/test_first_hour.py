"""What a new user meets in the first hour (issue 28): one-line parser errors with the nearest option,
the reasons samples failed, the phases that used to be silent, columns that read back the same in every
input format, and suggestions for clip-retrieval habits."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import REPO, cli_in_process, jpeg_bytes, run_cli

from clip_fabric.config import DataArgs, ModelArgs, OutputArgs, ZeroShotArgs
from clip_fabric.predict import setup
from clip_fabric.progress import Progress, process_seconds
from clip_fabric.reasons import count_reasons, describe


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data.batchsize", "8"], "did you mean --data.batch_size?"),
        (["--mode", "iamge"], "--mode: 'iamge' is not one of"),
        (["--data.batch_size", "abc"], "--data.batch_size: 'abc' is not int or 'auto'"),
    ],
)
def test_a_parser_error_is_one_line_with_the_nearest_option(capsys, tmp_path, args, expected):
    result = cli_in_process(capsys, "predict", "--output.dir", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no usage dump
    assert lines[0].startswith("clip_fabric: error: ") and expected in lines[0], lines[0]
    assert "__main__.py" not in result.stderr


def test_a_yaml_syntax_error_names_its_file(capsys, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("data:\n  format: [folder\n")
    result = cli_in_process(capsys, "predict", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0] and "<unicode string>" not in lines[0], lines


def test_a_misspelt_key_in_a_yaml_file_gets_the_nearest(capsys, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("data:\n  batchsize: 8\n")
    result = cli_in_process(capsys, "predict", "--config", str(config))
    assert result.returncode == 2
    assert "did you mean data.batch_size?" in result.stderr.strip().splitlines()[-1]


def test_a_misspelt_command_gets_the_nearest(capsys):
    result = cli_in_process(capsys, "predcit")
    assert result.returncode == 2 and "did you mean predict?" in result.stderr


@pytest.mark.slow
def test_usage_names_the_command_a_user_types(tmp_path):
    result = run_cli("predict", "--data.batchsize", "8", "--output.dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "clip_fabric: error: unrecognized option --data.batchsize 8: did you mean --data.batch_size? "
        "(see python -m clip_fabric predict --help)"
    ]


def _folder_without_captions(root: Path, count: int = 3) -> Path:
    root.mkdir()
    for i in range(count):
        (root / f"im{i}.jpg").write_bytes(jpeg_bytes(i, (40, 30)))
    return root


def test_exit_3_and_the_final_line_name_the_reasons(capsys, tmp_path, tiny_config):
    source = _folder_without_captions(tmp_path / "images")
    result = cli_in_process(
        capsys, "predict", "--model.config", str(tiny_config), "--data.format", "folder",
        "--data.source", str(source), "--data.num_workers", "0", "--mode", "text",
        "--output.dir", str(tmp_path / "out"), "--accelerator", "cpu",
    )  # fmt: skip
    assert result.returncode == 3
    assert "0 rows, 3 skipped samples (errors/: 3x no caption file im0.txt)" in result.stdout
    assert "every sample failed (3 recorded in errors/: 3x no caption file im0.txt)" in result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["error_reasons"] == [["no caption file im0.txt", 3]]


def test_reasons_alike_but_for_names_and_numbers_count_together():
    reasons = ["no caption file a1.txt", "empty file", "no caption file b22.txt", "image too large (99 px)"]
    counted = count_reasons(reasons)
    assert counted == [["no caption file a1.txt", 2], ["empty file", 1], ["image too large (99 px)", 1]]
    assert describe(counted, shown=2) == "2x no caption file a1.txt; 1x empty file; 1 other"
    assert describe([]) == ""


def test_files_mode_paths_are_absolute_and_in_the_errors(tmp_path, tiny_config):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "good.jpg").write_bytes(jpeg_bytes(0, (40, 30)))
    (tmp_path / "lists" / "broken.jpg").write_bytes(b"not an image")
    listing = tmp_path / "lists" / "list.csv"
    pd.DataFrame({"image_path": ["good.jpg", "broken.jpg"], "caption": ["", "x"]}).to_csv(
        listing, index=False
    )
    data = DataArgs(format="files", source=str(listing), num_workers=0)
    out = tmp_path / "out"
    setup(model=ModelArgs(config=str(tiny_config)), data=data, output=OutputArgs(dir=str(out)),
          accelerator="cpu")  # fmt: skip
    meta = pq.read_table(out / "metadata" / "metadata_0.parquet").to_pylist()
    assert meta == [{"key": "000000000", "image_path": str(tmp_path / "lists" / "good.jpg"), "caption": None}]
    errors = pq.read_table(out / "errors" / "errors_0.parquet").to_pylist()
    assert errors[0]["key"] == "000000001" and errors[0]["image_path"] == str(
        tmp_path / "lists" / "broken.jpg"
    )


@pytest.mark.parametrize("kind", ["files-text", "folder-image", "webdataset-both"])
def test_the_readme_snippet_reads_every_output(tmp_path, tiny_config, image_folder, wds_shards, kind):
    from embedding_reader import EmbeddingReader

    if kind == "files-text":
        listing = tmp_path / "captions.txt"
        listing.write_text("a cat\na dog\n")
        data, mode, tower = DataArgs(format="files", source=str(listing), num_workers=0), "text", "text_emb"
    elif kind == "folder-image":
        data, mode, tower = (
            DataArgs(format="folder", source=str(image_folder), num_workers=0),
            "image",
            "img_emb",
        )
    else:
        source = str(wds_shards[0])
        data, mode, tower = DataArgs(format="webdataset", source=source, num_workers=0), "both", "img_emb"
    out = tmp_path / "out"
    setup(model=ModelArgs(config=str(tiny_config)), data=data, output=OutputArgs(dir=str(out)), mode=mode,
          accelerator="cpu")  # fmt: skip
    reader = EmbeddingReader(
        str(out / tower), file_format="parquet_npy", metadata_folder=str(out / "metadata"),
        meta_columns=["image_path", "caption"],
    )  # fmt: skip
    _, meta = next(iter(reader(batch_size=100, start=0, end=reader.count)))
    assert {"image_path", "caption"} <= set(meta.columns) and len(meta) == reader.count > 0


def test_a_blank_caption_is_null_in_every_format():
    from clip_fabric.modes import MODES

    rows = [{"key": "a", "caption": ""}, {"key": "b", "caption": "  "}, {"key": "c", "caption": "x"}]
    finished = MODES["image"].finish(rows, {"image": np.zeros((3, 2), np.float32)})
    assert [r["caption"] for r in finished.rows] == [None, None, "x"]
    assert all(r["image_path"] is None for r in finished.rows)


def test_the_model_load_and_the_classifier_build_are_announced_and_out_of_the_rate(
    capsys, tmp_path, tiny_config, image_folder, monkeypatch
):
    from clip_fabric import zeroshot

    build = zeroshot.sharded_classifier

    def slow_build(*args, **kwargs):
        time.sleep(2.0)  # a CPU classifier of 1000 classes x 80 prompts takes a minute
        return build(*args, **kwargs)

    monkeypatch.setattr(zeroshot, "sharded_classifier", slow_build)  # predict imports it when it runs
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    summary = setup(
        model=ModelArgs(config=str(tiny_config)),
        data=DataArgs(format="folder", source=str(image_folder), num_workers=0),
        output=OutputArgs(dir=str(tmp_path / "out")),
        mode="zeroshot",
        accelerator="cpu",
        zeroshot=ZeroShotArgs(class_names=str(classes), templates="simple", top_k=1),
    )
    out = capsys.readouterr().out
    assert "clip_fabric: loading model tiny-clip ..." in out
    assert "clip_fabric: building the zero-shot classifier (2 classes x 7 prompts) ..." in out
    this = summary["this_run"]
    assert this["setup_s"] >= 2.0
    assert this["samples_per_s"] > this["rows"] / 2.0  # the 2 s build is not in the rate
    assert f"this run 11 rows in {this['seconds']:.1f} s wall" in out


def test_the_wall_time_counts_from_the_process_start():
    assert process_seconds(time.perf_counter()) > 1.0  # this test process has run for longer (imports)


@pytest.mark.slow
def test_the_final_line_gives_the_wall_time_a_user_measures(tmp_path, tiny_config, image_folder):
    start = time.monotonic()
    result = run_cli(
        "predict", "--model.config", str(tiny_config), "--data.format", "folder", "--data.source",
        str(image_folder), "--data.num_workers", "0", "--output.dir", str(tmp_path / "out"),
        "--accelerator", "cpu",
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    wall = float(re.search(r"this run 11 rows in ([\d.]+) s wall", result.stdout).group(1))
    assert elapsed - 3.0 <= wall <= elapsed  # imports included; only the interpreter's exit is not


def test_tar_input_shows_shards_done_of_total():
    progress = Progress(0, None, "samples", True, shards=3)
    with progress:
        progress.add(4, 0, 0, 0.01, last=True)
        progress.add(4, 1, 0, 0.01, last=False)
        progress.add(2, 0, 0, 0.01, last=True)
    assert progress.shards_done == 2
    assert progress._bar.postfix.startswith("shards 2/3, ETA ")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.name", "ViT-B/32"], "did you mean --model.name ViT-B-32?"),
        (["--model.name", "ViT-L/14@336px"], "did you mean --model.name ViT-L-14-336?"),
        (["--model.name", "vit-b-16"], "did you mean --model.name ViT-B-16?"),
        (["--model.name", "NotAModel-99"], "unknown open_clip model 'NotAModel-99': pick one of"),
    ],
)
def test_a_model_name_gets_the_nearest_open_clip_name(capsys, tmp_path, args, expected):
    result = cli_in_process(capsys, "predict", "--output.dir", str(tmp_path / "out"), *args)
    assert result.returncode == 1 and expected in result.stderr, result.stderr


def test_files_format_on_a_folder_suggests_folder(capsys, tmp_path, image_folder):
    result = cli_in_process(
        capsys, "predict", "--data.format", "files", "--data.source", str(image_folder),
        "--output.dir", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode != 0
    assert "is a folder: use --data.format folder" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("inside", [False, True])
def test_an_output_dir_that_is_a_file_is_named(capsys, tmp_path, inside):
    afile = tmp_path / "results.parquet"
    afile.write_bytes(b"x")
    target = afile / "run" if inside else afile
    result = cli_in_process(capsys, "predict", "--output.dir", str(target))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and "File exists" not in last
    assert last.startswith(f"clip_fabric: error: --output.dir '{target}' is ") and "not a folder" in last


def test_no_srun_hint_where_slurm_is_installed(tmp_path, monkeypatch, recwarn):
    from clip_fabric.launch import build_fabric

    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{os.environ['PATH']}")
    for name in [v for v in os.environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    build_fabric("cpu")
    assert not [w for w in recwarn if "srun" in str(w.message)]


def test_random_weights_are_warned_once(tiny_config, caplog):
    from clip_fabric.model import load_model

    load_model(ModelArgs(config=str(tiny_config)))
    said = [r for r in caplog.records if "random" in r.getMessage().lower()]
    assert len(said) == 1 and "NO PRETRAINED WEIGHTS" in said[0].getMessage()


def test_an_empty_input_is_reported_before_the_model_loads_and_leaves_nothing(
    capsys, tmp_path, tiny_config, monkeypatch
):
    from clip_fabric import model

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for an empty input")

    monkeypatch.setattr(model, "load_model", no_model)  # predict imports it when it runs
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    result = cli_in_process(
        capsys, "predict", "--model.config", str(tiny_config), "--data.format", "folder",
        "--data.source", str(tmp_path / "empty"), "--output.dir", str(out), "--accelerator", "cpu",
    )  # fmt: skip
    assert result.returncode == 3
    assert result.stderr.strip().splitlines()[-1].startswith("clip_fabric: the input holds no samples")
    assert not out.exists()


def test_blank_lines_of_a_caption_list_are_counted(tmp_path, caplog):
    from clip_fabric.data.files import FileListSource

    listing = tmp_path / "captions.txt"
    listing.write_text("a cat\n\n  \na dog\n")
    source = FileListSource(str(listing), 10, text_only=True)
    assert source.count == 2
    assert any("2 blank line(s) skipped" in r.getMessage() for r in caplog.records)


def test_a_rerun_with_nothing_left_keeps_the_last_runs_figures(capsys, tmp_path, tiny_config, image_folder):
    args = dict(
        model=ModelArgs(config=str(tiny_config)),
        data=DataArgs(format="folder", source=str(image_folder), num_workers=0),
        output=OutputArgs(dir=str(tmp_path / "out")),
        accelerator="cpu",
    )
    first = setup(**args)
    again = setup(**args)
    assert first["this_run"]["rows"] == 11
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["this_run"] == first["this_run"] and written["nothing_left"] is True
    assert again["rows"] == 11 and again["this_run"]["rows"] == 11
    assert "nothing left to do: every shard was done before" in capsys.readouterr().out.splitlines()[-1]


def test_the_readme_sets_up_a_venv_and_a_cpu_only_install_at_the_pinned_versions():
    readme = (REPO / "README.md").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    setup_part = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert "python3 -m venv .venv" in setup_part and ". .venv/bin/activate" in setup_part
    cpu = next(line for line in setup_part.splitlines() if "download.pytorch.org/whl/cpu" in line)
    assert cpu.startswith("pip install ") and "--index-url https://download.pytorch.org/whl/cpu" in cpu
    for package in ("torch", "torchvision"):
        pinned = re.search(rf'"{package}==([\d.]+)"', pyproject).group(1)
        assert f"{package}=={pinned} " in cpu, (package, pinned, cpu)


def test_files_mode_text_output_carries_the_lists_image_paths(tmp_path, tiny_config):
    """Before: ``image_path`` was null in text mode, though the list names each row's image."""
    listing = tmp_path / "list.csv"
    listing.write_text("image_path,caption\nimgs/a.jpg,a cat\n,a dog\nhttp://host/c.jpg,a bird\n")
    out = tmp_path / "out"
    summary = setup(
        model=ModelArgs(config=str(tiny_config)),
        data=DataArgs(format="files", source=str(listing), num_workers=0),
        output=OutputArgs(dir=str(out)),
        mode="text",
        accelerator="cpu",
    )
    assert summary["rows"] == 3  # text mode reads no image: a missing file is no error
    meta = pd.concat(pd.read_parquet(p) for p in sorted((out / "metadata").glob("*.parquet")))
    assert meta["image_path"].tolist() == [str(tmp_path / "imgs" / "a.jpg"), None, "http://host/c.jpg"]
