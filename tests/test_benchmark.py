"""The benchmark command on the CPU with a tiny model: every measurement runs and is reported, the
end-to-end run embeds every generated image, the chart opens, bad options fail in one line."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import read_output
from PIL import Image

from clip_fabric.__main__ import main
from clip_fabric.benchmark import report as report_module
from clip_fabric.benchmark import shards


def test_shards_are_a_multiple_of_the_workers_and_about_a_thousand_images():
    assert shards.shard_layout(100_000, None, 16) == (96, 1042)
    assert shards.shard_layout(20_000, None, 16) == (16, 1250)
    assert shards.shard_layout(24, None, 2) == (2, 12)
    assert shards.shard_layout(24, 5, 2) == (5, 5)


def test_generated_jpegs_are_photo_sized_and_cached(tmp_path):
    sizes = [len(shards.synthetic_photo(i, (500, 375))) for i in range(4)]
    assert all(55_000 < s < 95_000 for s in sizes), sizes
    assert len(shards.synthetic_photo(0, (1024, 768))) in range(230_000, 370_000)
    assert shards.synthetic_photo(3, (500, 375)) == shards.synthetic_photo(3, (500, 375))

    first = shards.make_dataset(tmp_path, (40, 30), 7, shard_size=3, workers=1)
    assert (first["shards"], first["images"], first["generated_shards"]) == (3, 9, 3)
    with tarfile.open(Path(first["dir"]) / "000001.tar") as tar:
        names = tar.getnames()
        image = Image.open(io.BytesIO(tar.extractfile("000000003.jpg").read()))
    assert names == [f"00000000{i}.{ext}" for i in (3, 4, 5) for ext in ("jpg", "txt")]
    assert image.size == (40, 30)
    assert shards.make_dataset(tmp_path, (40, 30), 7, 3, 1)["generated_shards"] == 0  # reused


def test_one_generator_makes_the_three_pictures_each_decoder_test_needs():
    """Smooth, photo-like and noise pictures of one size compress in that order (what the decoder
    comparisons and the benchmark's photo sizes rely on); a kind or mode it has not fails in one line."""
    from clip_fabric.data.synthetic import synthetic_image

    smooth, photo, noise = (len(synthetic_image(0, (256, 192), p)) for p in ("smooth", "photo", "noise"))
    assert smooth < photo < noise
    assert shards.synthetic_photo(5, (64, 48)) == synthetic_image(5, (64, 48), "photo")
    assert Image.open(io.BytesIO(synthetic_image(1, (9, 7), "noise", mode="L", fmt="PNG"))).mode == "L"
    with pytest.raises(ValueError, match="picture 'flat' is not one of"):
        synthetic_image(0, (8, 8), "flat")
    with pytest.raises(ValueError, match="mode 'L' is for the noise picture only"):
        synthetic_image(0, (8, 8), "photo", mode="L")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image_sizes", "500"], "--image_sizes '500' is not WIDTHxHEIGHT"),
        (["--image_sizes", "[64x48,32x32]", "--num_images", "[10,20,30]"], "one per image size (2)"),
        (["--precision", "fp64"], "--precision 'fp64' is not one of"),
        (["--decode", "jpeg"], "predict refuses the end-to-end options"),
        (["--predict_args", "--data.nope 1"], "predict refuses the end-to-end options"),
        (["--models", "[NotAModel-99]"], "unknown open_clip model 'NotAModel-99'"),
        (["--folder_images", "-1"], "--folder_images must be >= 0"),
    ],
)
def test_bad_option_is_one_line_before_any_work(tmp_path, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "--work_dir", str(tmp_path / "work"), *args])
    error = str(exit_info.value.code)
    assert error.startswith("clip_fabric: error: ") and message in error
    assert "\n" not in error
    assert not (tmp_path / "work").exists()


def _tiny_benchmark(tiny_config, work) -> list[str]:
    """benchmark on the CPU: the tiny model, 24 images of 64x48, batches of 8, 2 workers."""
    return [
        "benchmark", "--model.config", str(tiny_config), "--precision", "32-true", "--image_sizes", "64x48",
        "--num_images", "24", "--batch_size", "8", "--num_workers", "2", "--accelerator", "cpu",
        "--model_seconds", "0.1", "--work_dir", str(work),
    ]  # fmt: skip


@pytest.mark.slow
def test_benchmark_reports_model_pipeline_and_naive_loop(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the measurement processes on this small machine
    work = tmp_path / "work"
    main([*_tiny_benchmark(tiny_config, work), "--naive_batch_size", "8"])
    report = json.loads((work / "benchmark.json").read_text())
    assert report["weights"].startswith("random-init weights")
    [data] = report["datasets"]
    assert (data["images"], data["shards"], data["image_size"]) == (24, 2, "64x48")

    [alone] = report["model_only"]
    assert (alone["model"], alone["precision"], alone.get("error")) == ("tiny-clip", "32-true", None)
    assert alone["images_per_s"] > 0 and alone["batch_latency_ms"] > 0

    [e2e] = report["end_to_end"]
    assert e2e["error"] is None, e2e
    assert e2e["images_per_s"] > 0 and e2e["devices"] == 1
    assert e2e["rows"] == e2e["images"] == 24
    embeddings, keys = read_output(Path(e2e["output_dir"]))
    assert embeddings.shape == (24, 32) and len(set(keys)) == 24  # every generated image, once

    [path] = report["data_path"]  # the loader and decode alone, on the same shards
    assert path["error"] is None, path
    assert path["images"] == 24 and path["images_per_s"] > 0 and path["decode_used"] == "cpu"
    assert "Data path alone" in report_module.format_tables(report)

    [naive] = report["naive"]
    assert naive["error"] is None, naive
    assert naive["images_per_s"] > 0 and naive["images"] == 24
    assert np.load(naive["embeddings_file"]).shape == (24, 32)
    assert e2e["vs_naive"] == pytest.approx(e2e["images_per_s"] / naive["images_per_s"], abs=1e-3)
    assert e2e["of_model_only"] == pytest.approx(e2e["images_per_s"] / alone["images_per_s"], abs=1e-3)

    with Image.open(work / "benchmark.png") as chart:
        chart.verify()
    with Image.open(work / "benchmark.png") as chart:
        assert chart.format == "PNG" and chart.size[0] >= 1000


def test_defaults_row_is_compared_with_the_fastest_tuned_run_on_the_same_images():
    tuned = {"model": "m", "image_size": "64x48", "devices": 1, "images": 24, "decode": None}
    report = {
        "model_only": [],
        "naive": [],
        "end_to_end": [
            tuned | {"input": "webdataset", "precision": "32-true", "images_per_s": 100.0, "wall_s": 10.0},
            tuned | {"input": "webdataset", "precision": "bf16-true", "images_per_s": 200.0, "wall_s": 8.0},
            tuned | {"input": "folder", "precision": "bf16-true", "images_per_s": 400.0, "wall_s": 4.0},
            tuned | {"input": "webdataset", "precision": "16-true", "images_per_s": None, "error": "OOM"},
        ],
        "defaults": [
            tuned | {"input": "webdataset", "images_per_s": 150.0, "wall_s": 16.0},
            tuned | {"input": "folder", "images_per_s": None, "error": "failed"},
        ],
    }
    report_module.add_ratios(report)
    shards_row, folder_row = report["defaults"]
    assert (shards_row["tuned_images_per_s"], shards_row["tuned_precision"]) == (200.0, "bf16-true")
    assert shards_row["of_tuned"] == 0.75 and shards_row["of_tuned_wall"] == 0.5
    assert folder_row["tuned_images_per_s"] == 400.0 and folder_row["of_tuned"] is None


PERFORMANCE_OPTIONS = ("--precision", "--data.batch_size", "--data.num_workers", "--data.decode", "--tf32")


@pytest.mark.slow
def test_defaults_run_predict_without_performance_options_on_shards_and_a_folder(
    tmp_path, tiny_config, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    work = tmp_path / "work"
    main([*_tiny_benchmark(tiny_config, work), "--folder_images", "20", "--defaults", "true",
          "--predict_args", "--data.max_image_pixels 1000000", "--naive", "false"])  # fmt: skip
    report = json.loads((work / "benchmark.json").read_text())
    shard_set, folder_set = report["datasets"]
    assert (shard_set["input"], shard_set["images"], folder_set["input"], folder_set["images"]) == (
        "webdataset", 24, "folder", 20
    )  # fmt: skip
    assert sorted(p.name for p in Path(folder_set["dir"]).iterdir()) == [f"{i:09d}.jpg" for i in range(20)]
    assert Path(folder_set["dir"], "000000003.jpg").read_bytes() == shards.synthetic_photo(3, (64, 48))

    tuned = {row["input"]: row for row in report["end_to_end"]}
    plain = {row["input"]: row for row in report["defaults"]}
    assert set(tuned) == set(plain) == {"webdataset", "folder"} and len(report["defaults"]) == 2
    assert "--data.shard_size 10" in tuned["folder"]["command"]  # 2 workers, 2 shards of the folder
    for kind, images in (("webdataset", 24), ("folder", 20)):
        row = plain[kind]
        assert row["error"] is None, row
        assert row["rows"] == row["images"] == tuned[kind]["rows"] == images
        assert f"--data.format {kind}" in row["command"]
        assert "--data.max_image_pixels" in tuned[kind]["command"]
        assert not [o for o in (*PERFORMANCE_OPTIONS, "--data.max_image_pixels") if o in row["command"]]
        assert row["precision_used"] and row["num_workers_used"] is not None  # as predict's summary says
        assert row["of_tuned"] == pytest.approx(row["images_per_s"] / tuned[kind]["images_per_s"], abs=1e-3)
        _, plain_keys = read_output(Path(row["output_dir"]))
        _, tuned_keys = read_output(Path(tuned[kind]["output_dir"]))
        assert sorted(plain_keys) == sorted(tuned_keys) and len(set(plain_keys)) == images

    with Image.open(work / "benchmark.png") as chart:
        chart.verify()


def test_photo_sizes_vary_within_their_range_and_are_fixed_by_index():
    from clip_fabric.benchmark.options import parse_size
    from clip_fabric.benchmark.shards import PHOTO, photo_size, size_label

    assert parse_size("photo") == PHOTO and size_label(PHOTO) == "photo"
    sizes = [photo_size(i) for i in range(500)]
    assert sizes == [photo_size(i) for i in range(500)]
    assert len(set(sizes)) > 400  # almost every image its own size
    for width, height in sizes:
        short, long = min(width, height), max(width, height)
        assert 256 <= short <= 768 and long <= 2 * short + 1
    assert {w > h for w, h in sizes} == {True, False}
