"""Issue 27: no sample can fail a job. Whatever a sample brings (bytes, names, metadata) is checked or
escaped where it is read, any exception while reading it becomes its error record, and a mode that does
not read captions does not fail on them. Each test checks the other samples' rows, end to end."""

from __future__ import annotations

import io
import os
import tarfile

import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes
from test_predict import predict

from clip_fabric.config import DataArgs
from clip_fabric.data.meta import json_fields

DEEP = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
SURROGATE = b'{"note": "\\ud800", "\\udc80key": ["\\ud800"]}'
TWICE = b'{"a.b": "flat", "a": {"b": "nested"}}'
NOT_UTF8 = b"caf\xe9"


def rows_and_errors(out) -> tuple[dict[str, dict], dict[str, str]]:
    rows = {}
    for path in sorted((out / "metadata").glob("*.parquet")):
        rows |= {r["key"]: r for r in pq.read_table(path).to_pylist()}
    errors = {}
    for path in sorted((out / "errors").glob("*.parquet")):
        errors |= {r["key"]: r["reason"] for r in pq.read_table(path).to_pylist()}
    return rows, errors


def test_poison_sidecars_and_names_in_a_folder_are_their_samples_errors(tmp_path, tiny_config):
    root = tmp_path / "imgs"
    root.mkdir()
    for i, stem in enumerate(["deep", "surrogate", "twice", "good1", "good2"]):
        (root / f"{stem}.jpg").write_bytes(jpeg_bytes(i, (16, 16)))
    (root / "deep.json").write_bytes(DEEP)
    (root / "surrogate.json").write_bytes(SURROGATE)
    (root / "twice.json").write_bytes(TWICE)
    name = os.fsencode(root) + b"/" + NOT_UTF8 + b".jpg"  # a file name that is not UTF-8
    with open(name, "wb") as f:
        f.write(jpeg_bytes(9, (16, 16)))
    data = DataArgs(format="folder", source=str(root), shard_size=100, num_workers=0)
    out, summary = predict(tmp_path, tiny_config, data)

    rows, errors = rows_and_errors(out)
    assert summary["rows"] == 4 and summary["errors"] == 2 and summary["shards_done"] == 1
    assert sorted(rows) == ["caf\\xe9.jpg", "good1.jpg", "good2.jpg", "surrogate.jpg"]
    assert rows["caf\\xe9.jpg"]["image_path"] == f"{root}/caf\\xe9.jpg"
    assert rows["surrogate.jpg"]["note"] == "\\ud800" and rows["surrogate.jpg"]["\\x80key"] == '["\\ud800"]'
    assert errors["deep.jpg"] == "metadata deep.json unreadable: nested too deeply to read"
    assert "field 'a.b' is given twice" in errors["twice.jpg"]


def tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_poison_members_in_a_tar_lose_only_their_samples(tmp_path, tiny_config):
    """Before, a RecursionError in one sample's .json was raised again by the handler for a broken tar,
    and the whole tar was lost; a lone surrogate or a non-UTF-8 member name failed the write."""
    path = tmp_path / "t.tar"
    with tarfile.open(
        path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for i, (key, json) in enumerate(
            [("k0", None), ("k1", DEEP), ("k2", SURROGATE), ("caf\udce9", None), ("k4", TWICE), ("k5", None)]
        ):
            tar_member(tar, f"{key}.jpg", jpeg_bytes(i, (16, 16)))
            tar_member(tar, f"{key}.txt", f"caption {i}".encode())
            if json:
                tar_member(tar, f"{key}.json", json)
    data = DataArgs(format="webdataset", source=str(path), num_workers=0)
    out, summary = predict(tmp_path, tiny_config, data, mode="both")

    rows, errors = rows_and_errors(out)
    assert sorted(rows) == ["caf\\xe9", "k0", "k2", "k5"] and summary["rows"] == 4
    assert rows["k2"]["note"] == "\\ud800" and rows["caf\\xe9"]["caption"] == "caption 3"
    assert sorted(errors) == ["k1", "k4"] and "nested too deeply" in errors["k1"]


@pytest.mark.parametrize("fmt", ["folder", "webdataset"])
def test_a_caption_that_is_not_utf8_fails_only_a_mode_that_reads_captions(tmp_path, tiny_config, fmt):
    names = {"a": b"fine caption", "b": b"bad " + NOT_UTF8}
    if fmt == "folder":
        source = tmp_path / "imgs"
        source.mkdir()
        for i, (stem, caption) in enumerate(names.items()):
            (source / f"{stem}.jpg").write_bytes(jpeg_bytes(i, (16, 16)))
            (source / f"{stem}.txt").write_bytes(caption)
        bad = "b.jpg"
    else:
        source = tmp_path / "t.tar"
        with tarfile.open(source, "w") as tar:
            for i, (stem, caption) in enumerate(names.items()):
                tar_member(tar, f"{stem}.jpg", jpeg_bytes(i, (16, 16)))
                tar_member(tar, f"{stem}.txt", caption)
                tar_member(tar, f"{stem}.cls", b"1" + NOT_UTF8 if stem == "b" else b"0")
        bad = "b"
    data = DataArgs(format=fmt, source=str(source), shard_size=10, num_workers=0)
    if fmt == "webdataset":
        data = DataArgs(format=fmt, source=str(source), num_workers=0)
    out, summary = predict(tmp_path, tiny_config, data, mode="image")
    rows, errors = rows_and_errors(out)
    assert summary["rows"] == 2 and not errors  # the image is read, its caption is not needed
    assert rows[bad]["caption"] is None

    out2 = tmp_path / "text"
    out2.mkdir()
    _, summary = predict(out2, tiny_config, data, mode="text")
    rows, errors = rows_and_errors(out2 / "out")
    assert summary["rows"] == 1 and f"{bad.split('.')[0]}.txt is not UTF-8 text" in errors[bad]


def test_json_fields_escape_what_a_writer_cannot_take():
    assert json_fields(SURROGATE) == {"note": "\\ud800", "\\x80key": '["\\ud800"]'}
    with pytest.raises(ValueError, match="nested too deeply"):
        json_fields(DEEP)
    with pytest.raises(ValueError, match="given twice"):
        json_fields(TWICE)


def test_a_tar_file_whose_name_is_not_utf8_is_embedded_and_its_errors_written(tmp_path, tiny_config):
    shards = tmp_path / "shards"
    shards.mkdir()
    name = os.fsdecode(os.fsencode(shards) + b"/" + NOT_UTF8 + b".tar")  # held with a surrogate escape
    with tarfile.open(name, "w") as tar:
        tar_member(tar, "k0.jpg", jpeg_bytes(0, (16, 16)))
        tar_member(tar, "k1.txt", b"a sample without an image")
    data = DataArgs(format="webdataset", source=str(shards), num_workers=0)
    out, summary = predict(tmp_path, tiny_config, data)
    assert summary["rows"] == 1 and summary["errors"] == 1 and summary["shards_done"] == 1
    (error,) = pq.read_table(next((out / "errors").glob("*.parquet"))).to_pylist()
    assert error["key"] == "k1" and error["source"] == f"{shards}/caf\\xe9.tar"
