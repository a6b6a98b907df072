"""Sources: shard layout, listing formats and tar reading, without a model."""

from __future__ import annotations

import tarfile

import pandas as pd
import pytest
from conftest import jpeg_bytes, write_tar

from clip_fabric.config import DataArgs
from clip_fabric.data import Shard, build_source, chunk
from clip_fabric.data.files import FileListSource
from clip_fabric.data.wds import WebDatasetSource, expand_urls


def test_chunk_covers_every_row_once():
    shards = chunk(23, 5, "x")
    assert [(s.start, s.stop) for s in shards] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert [s.index for s in shards] == list(range(5))
    assert chunk(0, 5, "x") == []


def test_rank_split_is_a_partition():
    shards = chunk(103, 10, "x")
    for world in (1, 2, 3, 4, 16):
        seen = sorted(s.index for rank in range(world) for s in shards[rank::world])
        assert seen == list(range(11))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_file_list_formats_and_column_choice(tmp_path, suffix):
    frame = pd.DataFrame({"url": ["a.jpg", "b.jpg", "c.jpg"], "title": ["1", "two", "3.0"]})
    path = tmp_path / f"list{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False)
    source = FileListSource(str(path), shard_size=2)
    assert source.images == ["a.jpg", "b.jpg", "c.jpg"] and source.captions == ["1", "two", "3.0"]
    assert [(s.start, s.stop) for s in source.shards()] == [(0, 2), (2, 3)]
    with pytest.raises(ValueError, match="--data.image_column 'file' is not a column"):
        FileListSource(str(path), 2, image_column="file")


def test_file_list_without_known_columns(tmp_path):
    path = tmp_path / "list.csv"
    pd.DataFrame({"a": [1]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="no image column"):
        FileListSource(str(path), 2)


def test_expand_urls(tmp_path, wds_shards):
    assert expand_urls(str(tmp_path)) == [str(p) for p in wds_shards]
    assert expand_urls("s3://b/x-{0..2}.tar") == ["s3://b/x-0.tar", "s3://b/x-1.tar", "s3://b/x-2.tar"]
    with pytest.raises(ValueError, match="none of its 2 tar files exists"):
        build_source(DataArgs(format="webdataset", source=str(tmp_path / "nope-{0..1}.tar")))


def test_tar_cut_inside_a_header_is_reported(tmp_path):
    path = write_tar(
        tmp_path / "t.tar", [{"__key__": f"k{i}", "jpg": jpeg_bytes(i, (20, 20))} for i in range(3)]
    )
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[2].offset + 100  # inside the third header
    path.write_bytes(path.read_bytes()[:cut])
    samples = list(WebDatasetSource([str(path)]).samples(Shard(0, str(path))))
    assert [s.key for s in samples[:2]] == ["k0", "k1"] and all(s.error is None for s in samples[:2])
    assert "not a whole number of 512-byte tar blocks" in samples[2].error


def test_sample_without_image_is_an_error(tmp_path):
    path = write_tar(tmp_path / "t.tar", [{"__key__": "k0", "txt": b"only text"}])
    (sample,) = WebDatasetSource([str(path)]).samples(Shard(0, str(path)))
    assert sample.error.startswith("no image field") and sample.caption == "only text"
    (text,) = WebDatasetSource([str(path)], text_only=True).samples(Shard(0, str(path)))
    assert text.error is None


def test_synthetic_is_deterministic():
    source = build_source(DataArgs(num_samples=5, shard_size=2))
    first = [s.image for shard in source.shards() for s in source.samples(shard)]
    again = [s.image for shard in source.shards() for s in source.samples(shard)]
    assert len(first) == 5 and first == again and first[0] != first[1]
    with pytest.raises(ValueError, match="--data.format is synthetic"):
        DataArgs(source="/some/folder")
