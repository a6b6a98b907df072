"""Each command's errors name its own options: the zero-shot class names and templates are
``--zeroshot.class_names``/``--zeroshot.templates`` in predict and verify-precision, and
``--class_names``/``--templates`` in evaluate, though one loader reads them for all three."""

from __future__ import annotations

import pytest
from conftest import cli_in_process


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--zeroshot.class_names", "nosuch.txt"], "--zeroshot.class_names 'nosuch.txt' is neither"),
        (["--zeroshot.templates", "nosuch.txt"], "--zeroshot.templates 'nosuch.txt' is neither"),
    ],
)
def test_predict_names_its_zeroshot_options(capsys, tmp_path, tiny_config, args, option):
    result = cli_in_process(
        capsys, "predict", "--mode", "zeroshot", "--accelerator", "cpu", "--model.config", str(tiny_config),
        "--data.num_samples", "4", "--output.dir", str(tmp_path / "out"), *args,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"clip_fabric: error: {option}"), result.stderr
    assert not (tmp_path / "out").exists()  # refused before the run folder is made


def test_predict_names_its_option_for_a_bad_template_file(capsys, tmp_path, tiny_config):
    (tmp_path / "t.txt").write_text("a photo without a slot\n")
    result = cli_in_process(
        capsys, "predict", "--mode", "zeroshot", "--accelerator", "cpu", "--model.config", str(tiny_config),
        "--data.num_samples", "4", "--output.dir", str(tmp_path / "out"),
        "--zeroshot.templates", str(tmp_path / "t.txt"),
    )  # fmt: skip
    assert result.returncode == 1
    assert f"clip_fabric: error: --zeroshot.templates {tmp_path / 't.txt'} line 1" in result.stderr


def test_verify_precision_names_its_zeroshot_option(capsys, tiny_config):
    result = cli_in_process(
        capsys, "verify-precision", "--accelerator", "cpu", "--precision", "32-true",
        "--model.config", str(tiny_config), "--zeroshot.class_names", "nosuch.txt",
    )  # fmt: skip
    assert result.returncode == 1
    assert "clip_fabric: error: --zeroshot.class_names 'nosuch.txt' is neither" in result.stderr


def test_evaluate_names_its_flat_options(capsys, tmp_path, tiny_config, image_folder):
    common = (
        "evaluate", "--accelerator", "cpu", "--model.config", str(tiny_config), "--data.format", "folder",
        "--data.source", str(image_folder), "--output", str(tmp_path / "e.json"),
    )  # fmt: skip
    names = cli_in_process(capsys, *common, "--class_names", "nosuch.txt")
    assert names.returncode == 1
    assert "clip_fabric: error: --class_names 'nosuch.txt' is neither" in names.stderr
    templates = cli_in_process(capsys, *common, "--templates", "nosuch.txt")
    assert "clip_fabric: error: --templates 'nosuch.txt' is neither" in templates.stderr
