"""Data parallel runs in real processes (gloo on CPU): every readable sample exactly once, the same rows
as one process, whatever the world size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import read_output, run_cli, write_tar

from clip_fabric.__main__ import main

pytestmark = pytest.mark.slow


def metadata(out):
    return pd.concat(pd.read_parquet(p) for p in sorted((out / "metadata").glob("*.parquet")))


def predict_cli(out, config, checkpoint, devices, *args):
    """The command as a user runs it; one device runs in this process (faster), more in real processes."""
    argv = [
        "predict", "--accelerator", "cpu", "--devices", str(devices), "--model.config", str(config),
        "--model.pretrained", str(checkpoint), "--output.dir", str(out), "--output.dtype", "float32",
        "--data.num_workers", "1", *args,
    ]  # fmt: skip
    if str(devices) == "1":
        main(argv)
        return None
    result = run_cli(*argv)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_ranks_write_the_same_rows_as_one(tmp_path, tiny_config, tiny_checkpoint, image_folder):
    data = [
        "--data.format",
        "folder",
        "--data.source",
        str(image_folder),
        "--data.shard_size",
        "2",
        "--data.batch_size",
        "3",
        "--mode",
        "both",
    ]
    predict_cli(tmp_path / "one", tiny_config, tiny_checkpoint, 1, *data)
    result = predict_cli(tmp_path / "two", tiny_config, tiny_checkpoint, 2, *data)

    assert "11 rows, 0 skipped samples" in result.stdout and "on 2 rank(s)" in result.stdout
    for tower in ("img_emb", "text_emb"):
        one, one_keys = read_output(tmp_path / "one", tower)
        two, two_keys = read_output(tmp_path / "two", tower)
        assert one_keys == two_keys and len(set(two_keys)) == 11
        np.testing.assert_allclose(one, two, atol=1e-6)


def test_more_ranks_than_shards(tmp_path, tiny_config, tiny_checkpoint, wds_shards):
    """One shard, two ranks: the rank without a shard writes nothing and still joins every collective."""
    data = ["--data.format", "webdataset", "--data.source", str(wds_shards[0]), "--data.batch_size", "2"]
    predict_cli(tmp_path / "one", tiny_config, tiny_checkpoint, 1, *data)
    result = predict_cli(tmp_path / "two", tiny_config, tiny_checkpoint, 2, *data)

    assert "5 rows" in result.stdout and "on 2 rank(s)" in result.stdout
    one, one_keys = read_output(tmp_path / "one")
    two, two_keys = read_output(tmp_path / "two")
    assert one_keys == two_keys == [f"s{i:05d}" for i in range(5)]
    np.testing.assert_allclose(one, two, atol=1e-6)


def test_hybrid_pairs_write_the_same_rows(tmp_path, tiny_config, tiny_checkpoint, wds_shards):
    write_tar(tmp_path / "shard-000003.tar", [])  # an empty shard
    data = ["--data.format", "webdataset", "--data.source", str(tmp_path / "shard-{000000..000003}.tar"),
            "--data.batch_size", "2", "--mode", "both"]  # fmt: skip
    predict_cli(tmp_path / "one", tiny_config, tiny_checkpoint, 1, *data)
    for devices, layout in ((2, "adjacent"), (4, "halves")):  # one pair; two pairs, rank g with g + 2
        out = tmp_path / f"hybrid-{layout}"
        result = predict_cli(out, tiny_config, tiny_checkpoint, devices, *data,
                             "--strategy", "hybrid", "--tower_layout", layout)  # fmt: skip

        assert "12 rows" in result.stdout and f"on {devices} rank(s)" in result.stdout
        for tower in ("img_emb", "text_emb"):
            one, one_keys = read_output(tmp_path / "one", tower)
            hybrid, hybrid_keys = read_output(out, tower)
            assert one_keys == hybrid_keys == [f"s{i:05d}" for i in range(12)]
            np.testing.assert_allclose(one, hybrid, atol=1e-6)
        np.testing.assert_allclose(
            metadata(tmp_path / "one")["similarity"], metadata(out)["similarity"], atol=1e-6
        )


def test_hybrid_refuses_an_odd_world_before_starting(tmp_path, tiny_config):
    result = run_cli(
        "predict", "--accelerator", "cpu", "--devices", "3", "--strategy", "hybrid", "--mode", "both",
        "--model.config", str(tiny_config), "--output.dir", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode != 0 and not (tmp_path / "out").exists()
    assert result.stderr.strip().splitlines()[-1].startswith("clip_fabric: error: --strategy hybrid pairs")


def test_tensor_parallel_vision_tower_writes_the_same_rows(
    tmp_path, tiny_config, tiny_checkpoint, wds_shards
):
    (tmp_path / "classes.txt").write_text("cat\ndog\ncar\nbird\n")
    data = ["--data.format", "webdataset", "--data.source", str(tmp_path / "shard-{000000..000002}.tar"),
            "--data.batch_size", "3", "--mode", "zeroshot", "--zeroshot.templates", "simple",
            "--zeroshot.class_names", str(tmp_path / "classes.txt"), "--zeroshot.top_k", "2"]  # fmt: skip
    predict_cli(tmp_path / "one", tiny_config, tiny_checkpoint, 1, *data)
    # One group of 2; then 2 data-parallel groups of 2 (dp2 x tp2).
    for name, layout in (("tp2", ["2"]), ("dp2xtp2", ["4", "--tensor_parallel_size", "2"])):
        out = tmp_path / name
        result = predict_cli(out, tiny_config, tiny_checkpoint, layout[0], *data, *layout[1:],
                             "--strategy", "tensor_parallel")  # fmt: skip

        assert "12 rows" in result.stdout and "this run 12 rows" in result.stdout
        one, one_keys = read_output(tmp_path / "one")
        tp, tp_keys = read_output(out)
        assert one_keys == tp_keys == [f"s{i:05d}" for i in range(12)]
        assert np.all(1 - (one.astype(np.float64) * tp).sum(-1) < 1e-5)
        assert list(metadata(tmp_path / "one")["label"]) == list(metadata(out)["label"])


def test_zeroshot_classifier_sharded_over_ranks(tmp_path, tiny_config, tiny_checkpoint, image_folder):
    (tmp_path / "classes.txt").write_text("cat\ndog\ncar\n")  # 3 classes over 2 ranks: uneven slices
    data = ["--data.format", "folder", "--data.source", str(image_folder), "--data.shard_size", "4",
            "--mode", "zeroshot", "--zeroshot.class_names", str(tmp_path / "classes.txt"),
            "--zeroshot.templates", "simple", "--zeroshot.top_k", "2"]  # fmt: skip
    predict_cli(tmp_path / "one", tiny_config, tiny_checkpoint, 1, *data)
    predict_cli(tmp_path / "two", tiny_config, tiny_checkpoint, 2, *data)

    one, two = metadata(tmp_path / "one"), metadata(tmp_path / "two")
    assert list(one["key"]) == list(two["key"]) and len(one) == 11
    assert [list(x) for x in one["topk_labels"]] == [list(x) for x in two["topk_labels"]]
    np.testing.assert_allclose(np.stack(one["topk_probs"]), np.stack(two["topk_probs"]), atol=1e-6)
