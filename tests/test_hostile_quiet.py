"""Issue 27, quieter gaps: a checkpoint that cannot be loaded and a YAML alias bomb are one line each;
every image format this Pillow reads is listed."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import cli_in_process, jpeg_bytes
from PIL import Image
from test_predict import predict

from clip_fabric.config import DataArgs
from clip_fabric.data import IMAGE_EXTENSIONS


@pytest.mark.parametrize("damage", ["not a state dict", "cut"])
def test_a_checkpoint_that_cannot_be_loaded_is_one_line(
    capsys, tmp_path, tiny_config, tiny_checkpoint, damage
):
    weights = tmp_path / "weights.pt"
    if damage == "cut":
        weights.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    else:
        torch.save([1, 2, 3], weights)  # a zip .pt that holds a list
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg_bytes(0, (16, 16)))
    result = cli_in_process(
        capsys, "predict", "--accelerator", "cpu", "--model.config", str(tiny_config), "--model.pretrained",
        str(weights), "--data.format", "folder", "--data.source", str(root), "--output.dir",
        str(tmp_path / "out"), "--data.num_workers", "0",
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"clip_fabric: error: --model.pretrained {weights} cannot be loaded as tiny-clip")


def test_a_yaml_alias_bomb_is_refused_before_it_is_expanded(capsys, tmp_path):
    from clip_fabric.config_files import MAX_CONFIG_VALUES

    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 9):  # 10**9 values once expanded
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 10)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    result = cli_in_process(capsys, "predict", "--config", str(bomb))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"clip_fabric: error: --config {bomb}: its YAML aliases expand to more than {MAX_CONFIG_VALUES:,} "
        "values: write the values out, or use fewer aliases"
    )
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    result = cli_in_process(capsys, "predict", f"--config={big}")
    assert result.returncode == 1 and "over the 1,048,576 a config may hold" in result.stderr


def test_every_image_format_pillow_reads_is_listed(tmp_path, tiny_config):
    root = tmp_path / "imgs"
    root.mkdir()
    image = Image.open(io.BytesIO(jpeg_bytes(0, (16, 16))))
    formats = {"jfif": "JPEG", "ppm": "PPM", "tga": "TGA", "ico": "ICO"}
    if "avif" in IMAGE_EXTENSIONS and "AVIF" in Image.SAVE:
        formats["avif"] = "AVIF"
    for ext, fmt in formats.items():
        image.save(root / f"a.{ext}", format=fmt)
    (root / "notes.h5").write_bytes(b"not an image folder's business")  # Pillow has a stub for it
    data = DataArgs(format="folder", source=str(root), num_workers=0)
    _, summary = predict(tmp_path, tiny_config, data)
    assert summary["rows"] == len(formats) and summary["errors"] == 0
