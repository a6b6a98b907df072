"""Output shards: only the towers that ran, through fsspec URLs as through a path, done markers last,
and read back by embedding-reader as the README shows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import REPO, read_output
from test_predict import predict

from clip_fabric.config import DataArgs, ModelArgs, OutputArgs, ZeroShotArgs
from clip_fabric.modes import Finished
from clip_fabric.predict import setup
from clip_fabric.run_folder import RunFolder
from clip_fabric.writers import ShardWriter

SKIPPED = {"run.json", "summary.json"}  # they name the output folder and this run's timings


def local_files(root) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() not in SKIPPED
    }


def memory_files(root: str) -> dict[str, bytes]:
    fs = fsspec.filesystem("memory")
    files = {path[len(root) + 1 :]: fs.cat_file(path) for path in fs.find(root)}
    return {k: v for k, v in files.items() if k not in SKIPPED}


def test_writer_puts_only_the_towers_given_and_each_done_marker_last(monkeypatch, tmp_path):
    url, root = f"memory://{tmp_path.name}/out", f"/{tmp_path.name}/out"
    puts = []
    put = RunFolder.put
    monkeypatch.setattr(RunFolder, "put", lambda self, rel, data: (puts.append(rel), put(self, rel, data)))
    writer = ShardWriter(url, num_shards=12, dtype="float32")
    emb = np.eye(3, 4, dtype=np.float32)
    rows = [{"key": f"k{i}", "caption": None} for i in range(3)]
    bad = [{"key": "bad", "source": "src", "reason": "empty file"}]
    writer.add(3, "src", Finished(rows[:2], {"image": emb[:2]}), [], last=False)
    writer.add(3, "src", Finished(rows[2:], {"image": emb[2:]}), bad, last=True)
    writer.add(7, "src", Finished(rows, {"image": emb}), [], last=True)
    writer.close()
    try:
        files = memory_files(root)
        assert sorted(files) == [
            "_done/03.json", "_done/07.json", "errors/errors_03.parquet", "img_emb/img_emb_03.npy",
            "img_emb/img_emb_07.npy", "metadata/metadata_03.parquet", "metadata/metadata_07.parquet",
        ]  # fmt: skip
        assert puts.index("_done/03.json") == max(i for i, p in enumerate(puts) if "_03" in p) + 1
        assert puts[-1] == "_done/07.json"
        sizes = {f: len(files[f]) for f in ("img_emb/img_emb_03.npy", "metadata/metadata_03.parquet",
                                             "errors/errors_03.parquet")}  # fmt: skip
        assert json.loads(files["_done/03.json"]) == {
            "shard": 3, "source": "src", "rows": 3, "errors": 1, "filtered": 0, "files": sizes,
        }  # fmt: skip
        assert RunFolder(url).done_shards().keys() == {3, 7}
        np.testing.assert_array_equal(np.load(fsspec.open(f"{url}/img_emb/img_emb_03.npy").open()), emb)
    finally:
        fsspec.filesystem("memory").rm(f"/{tmp_path.name}", recursive=True)


def test_memory_and_file_urls_write_the_same_files_as_a_local_path(
    tmp_path, tiny_config, tiny_checkpoint, image_folder
):
    data = DataArgs(format="folder", source=str(image_folder), shard_size=4, num_workers=0)
    local, _ = predict(tmp_path / "local", tiny_config, data, "both", tiny_checkpoint, dtype="float32")
    url_dir = tmp_path / "url"
    memory_root = f"/{tmp_path.name}/out"

    def run(out: str) -> dict:
        return setup(
            model=ModelArgs(config=str(tiny_config), pretrained=str(tiny_checkpoint)),
            data=data,
            output=OutputArgs(dir=out, dtype="float32"),
            mode="both",
            accelerator="cpu",
        )

    try:
        run(f"file://{url_dir}")
        run(f"memory://{memory_root}")
        expected = local_files(local)
        assert {"img_emb/img_emb_0.npy", "text_emb/text_emb_2.npy", "_done/2.json", "plan.json"} <= set(
            expected
        )
        assert local_files(url_dir) == expected
        assert memory_files(memory_root) == expected
        memory = fsspec.filesystem("memory")
        fingerprint = json.loads((local / "run.json").read_text())["fingerprint"]
        assert json.loads(memory.cat_file(f"{memory_root}/run.json"))["fingerprint"] == fingerprint

        # Resume works there too: a shard whose marker is gone is redone, the others are kept.
        memory.rm(f"{memory_root}/_done/1.json")
        memory.rm(f"{memory_root}/img_emb/img_emb_1.npy")
        summary = run(f"memory://{memory_root}")
        assert summary["this_run"]["rows"] == 4 and summary["rows"] == 11
        assert memory_files(memory_root) == expected
    finally:
        if fsspec.filesystem("memory").exists(f"/{tmp_path.name}"):
            fsspec.filesystem("memory").rm(f"/{tmp_path.name}", recursive=True)


TOWER_DIRS = {
    "image": {"img_emb"},
    "text": {"text_emb"},
    "both": {"img_emb", "text_emb"},
    "pair": set(),
    "zeroshot": {"img_emb"},
}


@pytest.mark.parametrize("mode", sorted(TOWER_DIRS))
def test_only_the_towers_that_ran_have_folders(tmp_path, tiny_config, image_folder, mode):
    """clip-retrieval's index fails on an empty text_emb/ (``No embeddings found in folder``)."""
    from embedding_reader import EmbeddingReader

    (tmp_path / "classes.txt").write_text("cat\ndog\ntree\n")
    out = tmp_path / "out"
    setup(
        model=ModelArgs(config=str(tiny_config)),
        data=DataArgs(format="folder", source=str(image_folder), shard_size=6, num_workers=0),
        output=OutputArgs(dir=str(out)),
        mode=mode,
        accelerator="cpu",
        zeroshot=ZeroShotArgs(str(tmp_path / "classes.txt"), "simple", top_k=2),
    )
    folders = {p.name for p in out.iterdir() if p.is_dir()}
    assert folders == TOWER_DIRS[mode] | {"metadata", "_done"}
    for tower in TOWER_DIRS[mode]:
        reader = EmbeddingReader(
            str(out / tower),
            file_format="parquet_npy",
            metadata_folder=str(out / "metadata"),
            meta_columns=["image_path", "caption"],
        )
        assert reader.count == 11 and reader.dimension == 32


def readme_reader_snippet() -> str:
    """The README's EmbeddingReader example, as a user copies it."""
    output = (REPO / "README.md").read_text().split("## Output", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", output, re.S)
    return next(block for block in blocks if "EmbeddingReader(" in block)


@pytest.mark.parametrize("kind", ["folder", "files", "webdataset"])
def test_readme_embedding_reader_example_reads_every_input_kind(
    tmp_path, tiny_config, tiny_checkpoint, image_folder, wds_shards, monkeypatch, kind
):
    if kind == "folder":
        data = DataArgs(format="folder", source=str(image_folder), shard_size=4, num_workers=0)
    elif kind == "files":
        images = sorted(image_folder.rglob("*.*g"))
        listing = tmp_path / "list.csv"
        pd.DataFrame(
            {
                "image_path": [str(p) for p in images],
                "caption": [p.with_suffix(".txt").read_text() for p in images],
            }
        ).to_csv(listing, index=False)
        data = DataArgs(format="files", source=str(listing), shard_size=4, num_workers=0)
    else:
        data = DataArgs(
            format="webdataset", source=str(tmp_path / "shard-{000000..000002}.tar"), num_workers=0
        )
    out, summary = predict(tmp_path, tiny_config, data, "both", tiny_checkpoint, dtype="float32")
    count = 12 if kind == "webdataset" else 11
    assert summary["rows"] == count
    columns = set(pq.read_schema(next((out / "metadata").glob("*.parquet"))).names)
    assert {"image_path", "caption"} <= columns  # the README's meta_columns, for every input kind

    monkeypatch.chdir(tmp_path)  # the snippet reads out/img_emb and out/metadata
    scope: dict = {}
    exec(readme_reader_snippet(), scope)
    reader = scope["reader"]
    assert reader.count == count and reader.dimension == 32
    embeddings, meta = zip(*reader(batch_size=5, start=0, end=reader.count), strict=True)
    np.testing.assert_array_equal(np.concatenate(embeddings), read_output(out)[0])
    meta = pd.concat(meta)
    assert {"image_path", "caption"} <= set(meta.columns) and meta["caption"].notna().all()
    if kind == "webdataset":  # the sample's key, as clip-retrieval writes it
        assert meta["image_path"].notna().all()
    else:
        assert all(Path(path).is_file() for path in meta["image_path"])


def test_a_shard_whose_pairs_are_all_filtered_has_no_embedding_files(tmp_path):
    """--threshold can drop every pair of a shard: it is done, with neither metadata nor zero-row arrays
    (embedding-reader pairs each .npy with its parquet)."""
    from clip_fabric.modes import MODES

    image = np.eye(3, dtype=np.float32)
    scores = np.array([0.1, 0.2, 0.3])
    outputs = {"image": image, "text": image, "similarity": scores}
    finished = MODES["both"].finish([{"key": str(i)} for i in range(3)], outputs, threshold=0.9)
    assert finished.rows == [] and finished.filtered == 3
    writer = ShardWriter(str(tmp_path), num_shards=1, dtype="float32")
    writer.add(0, "s0", finished, [], last=True)
    writer.close()
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["_done/0.json"], files
    assert json.loads((tmp_path / "_done" / "0.json").read_text())["filtered"] == 3
