"""What a new user meets in the first hour (issue 28): one-line parser errors with the nearest option,
the reasons samples failed, the phases that used to be silent, columns that read back the same in every
input format, and suggestions for clip-retrieval habits."""

from __future__ import annotations

import pytest
from conftest import cli_in_process, run_cli


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


def test_usage_names_the_command_a_user_types(tmp_path):
    result = run_cli("predict", "--data.batchsize", "8", "--output.dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "clip_fabric: error: unrecognized option --data.batchsize 8: did you mean --data.batch_size? "
        "(see python -m clip_fabric predict --help)"
    ]
