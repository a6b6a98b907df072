"""Sample metadata end to end: what the sources read lands in metadata/*.parquet as clip-retrieval
writes it (``image_path``, the ``.json`` fields), and odd caption columns no longer end the run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from conftest import jpeg_bytes, read_output, write_tar
from test_predict import predict

from clip_fabric.config import DataArgs


def metadata(out) -> pd.DataFrame:
    return pd.concat(pd.read_parquet(p) for p in sorted((out / "metadata").glob("*.parquet")))


def wds_with_json(tmp_path, fields: list[dict]) -> str:
    samples = [
        {"__key__": f"s{i:03d}", "jpg": jpeg_bytes(i, (40, 30)), "txt": f"caption {i}".encode(),
         "json": json.dumps(f).encode()}
        for i, f in enumerate(fields)
    ]  # fmt: skip
    write_tar(tmp_path / "shard-0.tar", samples[:2])
    write_tar(tmp_path / "shard-1.tar", samples[2:])
    return str(tmp_path / "shard-{0..1}.tar")


def test_webdataset_metadata_has_image_path_and_json_fields(tmp_path, tiny_config):
    from embedding_reader import EmbeddingReader

    fields = [{"url": f"http://x/{i}.jpg", "width": 40, "exif": {"Make": "Canon"}} for i in range(3)]
    data = DataArgs(format="webdataset", source=wds_with_json(tmp_path, fields), num_workers=0)
    out, summary = predict(tmp_path, tiny_config, data, mode="both")
    assert summary["rows"] == 3 and summary["errors"] == 0
    meta = metadata(out)
    assert list(meta["key"]) == list(meta["image_path"]) == ["s000", "s001", "s002"]
    assert list(meta["url"]) == [f"http://x/{i}.jpg" for i in range(3)]
    assert list(meta["width"]) == ["40"] * 3 and list(meta["exif.Make"]) == ["Canon"] * 3
    # README's EmbeddingReader snippet, on webdataset output.
    reader = EmbeddingReader(
        embeddings_folder=str(out / "img_emb"), metadata_folder=str(out / "metadata"),
        meta_columns=["image_path", "caption", "url"], file_format="parquet_npy",
    )  # fmt: skip
    (emb, rows), *_ = list(reader(batch_size=100, start=0, end=reader.count))
    np.testing.assert_array_equal(emb, read_output(out)[0])
    assert list(rows["caption"]) == [f"caption {i}" for i in range(3)]


def test_json_fields_that_differ_between_rows_all_become_columns(tmp_path, tiny_config):
    fields = [{"url": "u0"}, {"url": "u1", "width": 7}, {"url": "u2"}]
    data = DataArgs(format="webdataset", source=wds_with_json(tmp_path, fields), num_workers=0)
    out, _ = predict(tmp_path, tiny_config, data)
    meta = pd.read_parquet(out / "metadata" / "metadata_0.parquet")
    assert list(meta["url"]) == ["u0", "u1"] and list(meta["width"]) == [None, "7"]


def test_numeric_caption_column_is_embedded_as_text(tmp_path, tiny_config, image_folder):
    paths = sorted(str(p) for p in image_folder.rglob("*.jpg"))[:3]
    listing = tmp_path / "list.parquet"
    pd.DataFrame({"image_path": paths, "caption": [7, 3, 12]}).to_parquet(listing)
    data = DataArgs(format="files", source=str(listing), num_workers=0)
    out, summary = predict(tmp_path, tiny_config, data, mode="both")
    assert summary["rows"] == 3 and summary["errors"] == 0
    assert list(metadata(out)["caption"]) == ["7", "3", "12"]


def test_folder_json_lands_in_metadata(tmp_path, tiny_config, image_folder):
    (image_folder / "a" / "img01.json").write_text('{"license": "cc-by", "size": {"w": 64}}')  # the 1st image
    data = DataArgs(format="folder", source=str(image_folder), num_workers=0)
    out, summary = predict(tmp_path, tiny_config, data)
    meta = metadata(out).set_index("key")
    assert summary["rows"] == 11
    assert meta.loc["a/img01.jpg", "license"] == "cc-by" and meta.loc["a/img01.jpg", "size.w"] == "64"
    assert meta["license"].isna().sum() == 10
