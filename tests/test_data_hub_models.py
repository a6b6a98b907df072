"""``hf-hub:ORG/NAME`` models load through open_clip from the Hugging Face cache, offline; uncached
offline, set-up fails with one line that says so. The cache is a fake one built in ``tmp_path``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import REPO, TINY_CONFIG, cli_in_process

from clip_fabric.config import ModelArgs
from clip_fabric.model import check_model, load_model

REPO_ID = "someone/tiny-clip"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> dict[str, bytes]:
    """open_clip_config.json and open_clip_pytorch_model.bin of the tiny model, as such a repo holds."""
    config = tmp_path_factory.mktemp("hub") / "hub-tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(99)
    model = open_clip.create_model("hub-tiny")
    weights = config.parent / "weights.bin"
    torch.save(model.state_dict(), weights)
    return {
        "open_clip_config.json": json.dumps({"model_cfg": TINY_CONFIG}).encode(),
        "open_clip_pytorch_model.bin": weights.read_bytes(),
    }


def hub_cache(root: Path, files: dict[str, bytes], repo: str = REPO_ID) -> Path:
    """A Hugging Face hub cache holding ``files`` as the snapshot of ``repo``'s main branch."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return root


def test_uncached_hub_model_offline_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli_in_process(
        capsys, "predict", "--accelerator", "cpu", "--model.name", "hf-hub:timm/ViT-B-16-SigLIP",
        "--model.cache_dir", str(tmp_path / "empty"),
    )  # fmt: skip
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith(
        "clip_fabric: error: hf-hub:timm/ViT-B-16-SigLIP: its open_clip config and weights are not in "
    )
    assert "hub cannot be reached" in line and "unknown" not in line
    assert not (tmp_path / "out").exists()


def test_cached_hub_model_loads_offline_with_its_weights(tmp_path, tiny_weights):
    cache = hub_cache(tmp_path / "hub", tiny_weights)
    args = ModelArgs(name=f"hf-hub:{REPO_ID}", cache_dir=str(cache))
    check_model(args)
    model, preprocess, tokenizer = load_model(args)
    saved = torch.load(cache / next(cache.glob("*/snapshots/*/*.bin")), weights_only=True)
    torch.testing.assert_close(model.state_dict()["text_projection"], saved["text_projection"])
    assert tokenizer(["a photo"]).shape == (1, TINY_CONFIG["text_cfg"]["context_length"])

    partial = hub_cache(
        tmp_path / "partial", {"open_clip_config.json": tiny_weights["open_clip_config.json"]}
    )
    with pytest.raises(RuntimeError, match="its open_clip weights are not in"):
        check_model(ModelArgs(name=f"hf-hub:{REPO_ID}", cache_dir=str(partial)))
    with pytest.raises(ValueError, match="leave --model.pretrained out"):
        check_model(ModelArgs(name=f"hf-hub:{REPO_ID}", pretrained="openai"))
    with pytest.raises(ValueError, match="hf-hub:ORG/NAME"):
        check_model(ModelArgs(name="hf-hub:no-org"))


@pytest.mark.slow
def test_predict_with_a_hub_model_from_hf_home(tmp_path, tiny_weights):
    """The user's way: HF_HOME says where the cache is; nothing names it on the command line."""
    hub_cache(tmp_path / "hf" / "hub", tiny_weights)
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    cmd = [
        sys.executable, "-m", "clip_fabric", "predict", "--accelerator", "cpu", "--model.name",
        f"hf-hub:{REPO_ID}", "--data.num_samples", "4", "--data.image_size", "[40,30]",
        "--data.num_workers", "0", "--output.dir", str(tmp_path / "out"),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 rows" in result.stdout and "RANDOM weights" not in result.stderr


def test_a_hub_repo_that_changed_is_not_resumed_into(tmp_path, tiny_weights):
    """A new commit of the repo under the same name is other weights: the fingerprint holds the snapshot."""
    from clip_fabric.config import DataArgs, OutputArgs
    from clip_fabric.model import hf_hub_revision
    from clip_fabric.run_folder import fingerprint

    cache = hub_cache(tmp_path / "hub", tiny_weights)
    args = ModelArgs(name=f"hf-hub:{REPO_ID}", cache_dir=str(cache))
    assert hf_hub_revision(args) == "0123456789abcdef0123456789abcdef01234567"
    first = fingerprint(args, DataArgs(), OutputArgs(), "image", "32-true", hf_hub_revision(args))
    base = cache / f"models--{REPO_ID.replace('/', '--')}"
    newer = "fedcba9876543210fedcba9876543210fedcba98"
    (base / "snapshots" / "0123456789abcdef0123456789abcdef01234567").rename(base / "snapshots" / newer)
    (base / "refs" / "main").write_text(newer)
    assert hf_hub_revision(args) == newer
    assert fingerprint(args, DataArgs(), OutputArgs(), "image", "32-true", hf_hub_revision(args)) != first
    assert hf_hub_revision(ModelArgs(name="ViT-B-32")) is None
