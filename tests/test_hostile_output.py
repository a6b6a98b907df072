"""Issue 27: a run touches nothing that is not its own, and trusts no state it did not write whole.
Issue 28 item 2: a done shard whose input files changed is redone, and the output says so."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import cli_in_process, jpeg_bytes, read_output
from test_predict import predict
from test_run_folder import folder_data, predict_args

from clip_fabric.config import ModelArgs, OutputArgs
from clip_fabric.data.folder import FolderSource
from clip_fabric.predict import setup
from clip_fabric.run_folder import EXIT_NO_ROWS, RunFolder


def predict_into(out, config, data, **kw) -> dict:
    return setup(model=ModelArgs(config=str(config)), data=data, output=OutputArgs(dir=str(out), **kw),
                 accelerator="cpu")  # fmt: skip


# -- data that is not the run's -----------------------------------------------------------------


def test_a_folder_that_holds_no_run_is_never_overwritten(tmp_path, tiny_config, image_folder):
    """A dataset folder with its own metadata/, errors/ and summary.json lost all three to overwrite."""
    dataset = tmp_path / "dataset"
    for name in ("metadata/metadata_0.parquet", "errors/notes.txt", "summary.json"):
        (dataset / name).parent.mkdir(parents=True, exist_ok=True)
        (dataset / name).write_text(f"the user's {name}")
    for overwrite in (True, False):
        with pytest.raises(ValueError, match=r"holds errors, metadata, summary.json but no run.json"):
            predict_into(dataset, tiny_config, folder_data(image_folder), overwrite=overwrite)
    for name in ("metadata/metadata_0.parquet", "errors/notes.txt", "summary.json"):
        assert (dataset / name).read_text() == f"the user's {name}"


def test_links_planted_in_the_output_folder_are_never_written_through(tmp_path, tiny_config, image_folder):
    out, _ = predict(tmp_path, tiny_config, folder_data(image_folder))
    (out / "_done" / "0.json").unlink()  # shard 0 is rewritten by the rerun
    victims = {}
    for name in ("_lock.json", ".run.json.tmp", "metadata/.metadata_0.parquet.tmp", "_done/.0.json.tmp"):
        victim = tmp_path / f"victim-{len(victims)}.txt"
        victim.write_text("precious")
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(victim)
        victims[name] = victim
    _, summary = predict(tmp_path, tiny_config, folder_data(image_folder))
    assert summary["rows"] == 11 and summary["this_run"]["rows"] == 4
    assert {name: v.read_text() for name, v in victims.items()} == dict.fromkeys(victims, "precious")


# -- listing --------------------------------------------------------------------------------------


def test_a_sub_folder_that_cannot_be_listed_is_recorded_and_the_walk_goes_on(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    for name in ("a/one.jpg", "locked/two.jpg", "z/three.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(jpeg_bytes(0, (8, 8)))
    deep = os.open(root / "z", os.O_RDONLY)  # a path past PATH_MAX, made one level at a time
    for _ in range(24):
        os.mkdir("d" * 200, dir_fd=deep)
        deep, parent = os.open("d" * 200, os.O_RDONLY, dir_fd=deep), deep
        os.close(parent)
    os.close(deep)
    scandir = os.scandir

    def no_permission(path):  # chmod 000 as a non-root user (the tests may run as root)
        if os.path.basename(os.fspath(path)) == "locked":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", no_permission)
    source = FolderSource(str(root), 100)
    samples = {s.key: s for shard in source.shards() for s in source.samples(shard)}
    assert samples["a/one.jpg"].error is None and samples["z/three.jpg"].error is None
    assert samples["locked/"].error == (
        f"unreadable folder {root / 'locked'}: Permission denied; its images are not listed"
    )
    (long,) = [k for k in samples if k.startswith("z/d")]
    assert "File name too long" in samples[long].error


# -- done markers ---------------------------------------------------------------------------------


def test_an_output_cut_behind_its_done_marker_is_redone(tmp_path, tiny_config, image_folder, caplog):
    out, _ = predict(tmp_path, tiny_config, folder_data(image_folder))
    npy = out / "img_emb" / "img_emb_1.npy"
    npy.write_bytes(npy.read_bytes()[:100])
    _, summary = predict(tmp_path, tiny_config, folder_data(image_folder))
    assert summary["this_run"]["rows"] == 4 and summary["rows"] == 11
    assert "img_emb/img_emb_1.npy not as written" in caplog.text
    emb, keys = read_output(out)
    assert emb.shape[0] == len(keys) == 11


@pytest.mark.parametrize(
    "record", ['{"shard": 1, "rows": "10", "errors": 0}', '{"shard": Infinity, "rows": 4, "errors": 0}',
               '{"shard": 1, "rows": 4, "errors": true}', '{"shard": 2, "rows": 4, "errors": 0}'],
)  # fmt: skip
def test_a_done_marker_with_wrong_values_means_its_shard_is_redone(
    tmp_path, tiny_config, image_folder, caplog, record
):
    out, _ = predict(tmp_path, tiny_config, folder_data(image_folder))
    (out / "_done" / "1.json").write_text(record)
    _, summary = predict(tmp_path, tiny_config, folder_data(image_folder))
    assert summary["rows"] == 11 and summary["this_run"]["rows"] == 4 and summary["shards_done"] == 3
    assert f"{out / '_done' / '1.json'} is damaged" in caplog.text


@pytest.mark.parametrize("plan", ["[]", '[{"digest": "x"}, {"digest": "y"}, {"digest": "z"}]'])
def test_a_damaged_plan_is_one_line_naming_it(capsys, tmp_path, tiny_config, image_folder, plan):
    out = tmp_path / "out"
    assert cli_in_process(capsys, *predict_args(out, tiny_config, image_folder)).returncode == 0
    (out / "_done" / "2.json").unlink()
    (out / "plan.json").write_text(plan)
    result = cli_in_process(capsys, *predict_args(out, tiny_config, image_folder))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"clip_fabric: error: {out / 'plan.json'} is damaged")
    )


def test_a_local_output_dir_is_a_path_even_with_double_colons(tmp_path, tiny_config, image_folder):
    out = tmp_path / "a::b"
    predict_into(out, tiny_config, folder_data(image_folder))
    assert (out / "run.json").is_file() and len(read_output(out)[1]) == 11
    assert not (tmp_path / "a:").exists() and not (tmp_path / "a").exists()
    assert RunFolder(str(out)).root == str(out)


# -- metadata of a whole run ----------------------------------------------------------------------


def test_every_metadata_file_of_a_run_has_the_same_columns(tmp_path, tiny_config, image_folder):
    """A .json field absent from a whole shard made it unreadable through a folder-wide reader."""
    (image_folder / "b" / "img10.json").write_text('{"a": "only in the last shard"}')
    out, _ = predict(tmp_path, tiny_config, folder_data(image_folder))
    schemas = [pq.read_schema(p).names for p in sorted((out / "metadata").glob("*.parquet"))]
    assert len(schemas) == 3 and all(s == schemas[0] for s in schemas) and "a" in schemas[0]
    values = pq.read_table(out / "metadata").column("a").to_pylist()  # one schema for the folder
    assert values.count("only in the last shard") == 1 and values.count(None) == 10
    _, again = predict(tmp_path, tiny_config, folder_data(image_folder))
    # The padded shards stay done: the rerun embeds nothing (its summary keeps the last run that did).
    assert again["nothing_left"] and again["shards_done"] == 3


# -- issue 28 item 2: a fixed input is read again ---------------------------------------------------


def test_a_done_shard_whose_captions_were_added_is_redone(capsys, tmp_path, tiny_config, caplog):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(6):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes(i, (16, 16)))
    out = tmp_path / "out"
    args = predict_args(out, tiny_config, root, "--mode", "text")
    first = cli_in_process(capsys, *args)
    assert first.returncode == EXIT_NO_ROWS and "every sample failed (6 recorded" in first.stderr
    for i in range(6):
        (root / f"{i}.txt").write_text(f"caption {i}")
    caplog.clear()
    second = cli_in_process(capsys, *args)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "done shard(s) 0, 1 read input files (images, captions, .json) that changed since" in caplog.text
    assert "they are redone" in caplog.text
    emb, keys = read_output(out, "text_emb")
    assert sorted(keys) == [f"{i}.jpg" for i in range(6)] and not np.isnan(emb).any()
    assert json.loads((out / "summary.json").read_text())["errors"] == 0
