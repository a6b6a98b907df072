"""The command line as a user meets it: help, config files, and one-line errors before any work."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import REPO, cli_in_process, run_cli

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_help_lists_the_contract_options():
    result = run_cli("predict", "--help")
    assert result.returncode == 0
    for option in (
        "--model.name",
        "--model.pretrained",
        "--model.config",
        "--data.format",
        "--data.source",
        "--data.batch_size",
        "--data.num_workers",
        "--mode",
        "--output.dir",
        "--output.dtype",
        "--accelerator",
        "--devices",
        "--num_nodes",
        "--strategy",
        "--precision",
        "--print_config",
    ):
        assert option in result.stdout, option
    assert "Storage dtype of the L2-normalised embeddings" in result.stdout  # field docstrings are the help


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(capsys, config):
    result = cli_in_process(capsys, "predict", "--config", str(config), "--print_config")
    assert result.returncode == 0, result.stderr
    assert "model:" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data.nope", "3"], "nope"),
        (["--data.batch_size", "0"], "batch_size must be >= 1"),
        (["--data.format", "folder", "--data.source", "/no/such/dir"], "is not a folder"),
        (["--data.format", "tarballs"], "tarballs"),
        (["--mode", "video"], "video"),
        (["--model.name", "NotAModel-99"], "unknown open_clip model 'NotAModel-99'"),
        (["--model.pretrained", "/no/such/weights.pt"], "no such file exists"),
        (["--model.pretrained", "not-a-tag"], "known tags"),
        (["--strategy", "pipeline"], "unknown --strategy 'pipeline'"),
    ],
)
def test_bad_input_fails_before_work_with_one_clear_line(capsys, tmp_path, args, message):
    result = cli_in_process(capsys, "predict", "--output.dir", str(tmp_path / "out"), *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_uncached_tag_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    start = time.monotonic()
    result = run_cli(
        "predict",
        "--model.name",
        "ViT-B-32",
        "--model.pretrained",
        "openai",
        "--output.dir",
        str(tmp_path / "out"),
    )
    assert result.returncode != 0
    assert time.monotonic() - start < 60  # the hub client alone would retry for longer
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("clip_fabric: error: weights ViT-B-32/openai are not in the local cache")
    assert "--model.pretrained /path/to/weights" in last


def test_quickstart_runs_and_warns_about_random_weights(tmp_path):
    result = run_cli(
        "predict",
        "--config",
        str(REPO / "configs" / "quickstart.yaml"),
        "--output.dir",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stderr
    assert "clip_fabric: 8 rows, 0 skipped samples" in result.stdout
    assert len(list(Path(tmp_path / "out" / "img_emb").glob("*.npy"))) == 1
