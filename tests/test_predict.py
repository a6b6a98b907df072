"""The predict command end to end on one CPU process: outputs, parity with open_clip, bad samples."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import open_clip
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_output
from PIL import Image

from clip_fabric.config import DataArgs, ModelArgs, OutputArgs
from clip_fabric.predict import setup


def predict(tmp_path, config, data: DataArgs, mode="image", pretrained=None, **kw):
    out = tmp_path / "out"
    summary = setup(
        model=ModelArgs(config=str(config), pretrained=str(pretrained) if pretrained else None),
        data=data,
        output=OutputArgs(dir=str(out), **kw),
        mode=mode,
        accelerator="cpu",
    )
    return out, summary


def reference(config, checkpoint, images: list[Image.Image] = (), captions: list[str] = ()):
    """Plain open_clip: model.encode_image(preprocess(img)), normalised, in float64 for comparison."""
    open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(checkpoint))
    model.eval()
    with torch.no_grad():
        if images:
            feats = model.encode_image(torch.stack([preprocess(im) for im in images]))
        else:
            feats = model.encode_text(open_clip.get_tokenizer("tiny-clip")(list(captions)))
    return torch.nn.functional.normalize(feats.double(), dim=-1).numpy()


def test_folder_parity_with_open_clip(tmp_path, tiny_config, tiny_checkpoint, image_folder):
    data = DataArgs(format="folder", source=str(image_folder), batch_size=4, shard_size=5, num_workers=2)
    out, summary = predict(tmp_path, tiny_config, data, pretrained=tiny_checkpoint, dtype="float32")

    emb, keys = read_output(out)
    assert summary["rows"] == 11 and summary["errors"] == 0 and summary["shards_total"] == 3
    assert keys == sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.*g"))
    ref = reference(tiny_config, tiny_checkpoint, [Image.open(image_folder / k) for k in keys])
    cosine = (emb.astype(np.float64) * ref).sum(-1)
    assert emb.dtype == np.float32
    assert np.all(1 - cosine < 1e-5), cosine
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1, atol=1e-5)


def test_safetensors_checkpoint_and_float16_default(tmp_path, tiny_config, tiny_checkpoint, image_folder):
    from safetensors.torch import save_file

    state = torch.load(tiny_checkpoint)["state_dict"]
    path = tiny_checkpoint.parent / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    data = DataArgs(format="folder", source=str(image_folder), num_workers=0)
    out, _ = predict(tmp_path, tiny_config, data, pretrained=path)

    emb, keys = read_output(out)
    assert emb.dtype == np.float16
    ref = reference(tiny_config, tiny_checkpoint, [Image.open(image_folder / k) for k in keys])
    assert np.all((emb.astype(np.float64) * ref).sum(-1) > 1 - 1e-3)


def test_text_mode_from_txt_list(tmp_path, tiny_config, tiny_checkpoint):
    captions = [f"caption number {i}" for i in range(7)]
    listing = tmp_path / "captions.txt"
    listing.write_text("\n".join(captions) + "\n\n")
    data = DataArgs(format="files", source=str(listing), shard_size=3, num_workers=0)
    out, summary = predict(
        tmp_path, tiny_config, data, mode="text", pretrained=tiny_checkpoint, dtype="float32"
    )

    emb, keys = read_output(out, "text_emb")
    assert summary["rows"] == 7 and not list((out / "img_emb").glob("*.npy"))
    assert len(keys) == 7
    assert (
        pq.read_table(out / "metadata" / "metadata_0.parquet").column("caption").to_pylist() == captions[:3]
    )
    ref = reference(tiny_config, tiny_checkpoint, captions=captions)
    assert np.all(1 - (emb.astype(np.float64) * ref).sum(-1) < 1e-5)


def test_both_mode_csv_list_with_bad_rows(tmp_path, tiny_config, tiny_checkpoint, image_folder):
    good = sorted(image_folder.rglob("*.jpg"))[:5]
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    (tmp_path / "empty.jpg").write_bytes(b"")
    rows = [{"filepath": str(p), "caption": f"cap {i}"} for i, p in enumerate(good)]
    rows.insert(2, {"filepath": "broken.jpg", "caption": "broken"})  # relative to the list's folder
    rows.insert(4, {"filepath": str(tmp_path / "missing.jpg"), "caption": "missing"})
    rows.append({"filepath": "empty.jpg", "caption": "empty"})
    rows.append({"filepath": str(good[0]), "caption": None})
    listing = tmp_path / "list.csv"
    pd.DataFrame(rows).to_csv(listing, index=False)
    data = DataArgs(format="files", source=str(listing), shard_size=4, batch_size=2, num_workers=1)
    out, summary = predict(
        tmp_path, tiny_config, data, mode="both", pretrained=tiny_checkpoint, dtype="float32"
    )

    assert summary["rows"] == 5 and summary["errors"] == 4
    img, keys = read_output(out, "img_emb")
    txt, _ = read_output(out, "text_emb")
    assert img.shape == txt.shape == (5, 32)
    errors = pd.concat(pd.read_parquet(p) for p in sorted((out / "errors").glob("*.parquet")))
    reasons = dict(zip(errors["key"], errors["reason"], strict=True))
    assert set(errors["source"]) == {str(listing)}
    assert "undecodable image" in reasons["000000002"]
    assert "unreadable file" in reasons["000000004"]
    assert reasons["000000007"] == "empty file"
    assert reasons["000000008"] == "no caption"
    meta = pd.concat(pd.read_parquet(p) for p in sorted((out / "metadata").glob("*.parquet")))
    assert list(meta["caption"]) == [f"cap {i}" for i in range(5)]
    np.testing.assert_allclose(
        txt, reference(tiny_config, tiny_checkpoint, captions=[f"cap {i}" for i in range(5)]), atol=1e-5
    )


def test_webdataset_with_truncated_shard(tmp_path, tiny_config, tiny_checkpoint, wds_shards):
    # Cut the last shard inside its second image: the sample before the break is kept, the break recorded.
    with tarfile.open(wds_shards[-1]) as tar:
        cut = tar.getmembers()[2].offset_data + 100
    wds_shards[-1].write_bytes(wds_shards[-1].read_bytes()[:cut])
    source = str(tmp_path / "shard-{000000..000002}.tar")
    data = DataArgs(format="webdataset", source=source, batch_size=3, num_workers=2)
    out, summary = predict(tmp_path, tiny_config, data, mode="both", pretrained=tiny_checkpoint)

    _, keys = read_output(out)
    assert keys == [f"s{i:05d}" for i in range(10)]
    assert summary["rows"] == 10 and summary["errors"] == 1
    error = pd.read_parquet(out / "errors" / "errors_2.parquet")
    assert "tar shard unreadable" in error["reason"][0] and error["source"][0].endswith("shard-000002.tar")


def test_embedding_reader_reads_output(tmp_path, tiny_config, image_folder):
    from embedding_reader import EmbeddingReader

    data = DataArgs(format="folder", source=str(image_folder), shard_size=4, num_workers=0)
    out, _ = predict(tmp_path, tiny_config, data, mode="both")
    reader = EmbeddingReader(
        embeddings_folder=str(out / "img_emb"),
        metadata_folder=str(out / "metadata"),
        meta_columns=["image_path", "caption"],
        file_format="parquet_npy",
    )
    assert reader.count == 11 and reader.dimension == 32
    batches = list(reader(batch_size=100, start=0, end=reader.count))
    emb = np.concatenate([b[0] for b in batches])
    meta = pd.concat([b[1] for b in batches])
    np.testing.assert_array_equal(emb, read_output(out)[0])
    assert meta["image_path"].str.endswith(tuple(f"img{i:02d}.jpg" for i in range(11)) + (".png",)).all()


def test_rerun_skips_done_shards_and_refuses_changed_config(tmp_path, tiny_config, image_folder):
    data = DataArgs(format="folder", source=str(image_folder), shard_size=4, num_workers=0)
    out, first = predict(tmp_path, tiny_config, data)
    # Simulate a crash that lost shard 1: its done marker and files are gone, a stale tmp file remains.
    (out / "_done" / "1.json").unlink()
    (out / "img_emb" / "img_emb_1.npy").unlink()
    (out / "img_emb" / ".img_emb_1.npy.tmp").write_bytes(b"partial")
    _, second = predict(tmp_path, tiny_config, data)

    assert second["this_run"]["rows"] == 4 and second["rows"] == first["rows"] == 11
    assert read_output(out)[1] == read_output(out)[1] and len(read_output(out)[1]) == 11
    with pytest.raises(ValueError, match="different precision"):
        setup(
            model=ModelArgs(config=str(tiny_config)),
            data=data,
            output=OutputArgs(dir=str(out)),
            accelerator="cpu",
            precision="bf16-mixed",
        )
    _, third = predict(tmp_path, tiny_config, data, overwrite=True)
    assert third["this_run"]["rows"] == 11
    assert json.loads((out / "summary.json").read_text())["rows"] == 11


def test_pair_mode_scores_and_threshold(tmp_path, tiny_config, tiny_checkpoint, wds_shards):
    source = str(tmp_path / "shard-{000000..000002}.tar")
    data = DataArgs(format="webdataset", source=source, batch_size=5, num_workers=0)
    both, _ = predict(
        tmp_path / "both", tiny_config, data, mode="both", pretrained=tiny_checkpoint, dtype="float32"
    )
    img, keys = read_output(both, "img_emb")
    txt, _ = read_output(both, "text_emb")
    similarity = (img.astype(np.float64) * txt).sum(-1)
    meta = pd.concat(pd.read_parquet(p) for p in sorted((both / "metadata").glob("*.parquet")))
    np.testing.assert_allclose(meta["similarity"], similarity, atol=1e-5)

    threshold = float(np.median(similarity))
    out = tmp_path / "pair" / "out"
    summary = setup(
        model=ModelArgs(config=str(tiny_config), pretrained=str(tiny_checkpoint)),
        data=data,
        output=OutputArgs(dir=str(out)),
        mode="pair",
        accelerator="cpu",
        threshold=threshold,
    )
    kept = pd.concat(pd.read_parquet(p) for p in sorted((out / "metadata").glob("*.parquet")))
    expected = [k for k, s in zip(keys, similarity, strict=True) if s >= threshold]
    assert list(kept["key"]) == expected and 0 < len(expected) < 12
    assert summary["rows"] == len(expected) and summary["filtered"] == 12 - len(expected)
    assert summary["errors"] == 0 and not list((out / "img_emb").glob("*.npy"))
    np.testing.assert_allclose(kept["similarity"], similarity[similarity >= threshold], atol=1e-5)
    with pytest.raises(ValueError, match="use it with --mode pair or both"):
        setup(model=ModelArgs(config=str(tiny_config)), data=data, output=OutputArgs(dir=str(tmp_path / "x")),
              mode="image", accelerator="cpu", threshold=0.2)  # fmt: skip


def zeroshot_reference(config, checkpoint, images, names, templates, k):
    """Plain open_clip: mean of normalised prompt embeddings per class, softmax(scale * image @ W.T)."""
    open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer("tiny-clip")
    with torch.no_grad():
        weights = []
        for name in names:
            prompts = torch.nn.functional.normalize(
                model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1
            )
            weights.append(torch.nn.functional.normalize(prompts.mean(0), dim=-1))
        image = torch.nn.functional.normalize(
            model.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1
        )
        probs = (model.logit_scale.exp() * image @ torch.stack(weights).T).softmax(-1).numpy()
    order = np.argsort(-probs, axis=1)[:, :k]
    return [[names[i] for i in row] for row in order], np.take_along_axis(probs, order, axis=1)


def test_zeroshot_mode_matches_open_clip(tmp_path, tiny_config, tiny_checkpoint, image_folder):
    from clip_fabric.config import ZeroShotArgs

    names = ["cat", "dog", "red car", "mountain", "thing number one", "bowl of soup", "tree"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    templates = ["a photo of a {}.", "a drawing of a {}.", "{}"]
    (tmp_path / "templates.txt").write_text("\n".join(templates))
    out = tmp_path / "out"
    setup(
        model=ModelArgs(config=str(tiny_config), pretrained=str(tiny_checkpoint)),
        # open_clip's own preprocess: probabilities at logit scale 100 magnify the cpu path's 1e-7.
        data=DataArgs(format="folder", source=str(image_folder), batch_size=4, num_workers=0, decode="pil"),
        output=OutputArgs(dir=str(out), dtype="float32"),
        mode="zeroshot",
        accelerator="cpu",
        zeroshot=ZeroShotArgs(str(tmp_path / "classes.txt"), str(tmp_path / "templates.txt"), top_k=3),
    )
    meta = pd.read_parquet(out / "metadata" / "metadata_0.parquet")
    labels, probs = zeroshot_reference(
        tiny_config, tiny_checkpoint, [Image.open(image_folder / k) for k in meta["key"]], names, templates, 3
    )
    assert [list(x) for x in meta["topk_labels"]] == labels and list(meta["label"]) == [
        row[0] for row in labels
    ]
    np.testing.assert_allclose(np.stack(meta["topk_probs"]), probs, atol=1e-5)
    assert len(read_output(out)[1]) == 11  # the image embeddings are written too
    with pytest.raises(ValueError, match="top_k 9 exceeds the 7 class names"):
        setup(
            model=ModelArgs(config=str(tiny_config)), data=DataArgs(),
            output=OutputArgs(dir=str(tmp_path / "x")), mode="zeroshot", accelerator="cpu",
            zeroshot=ZeroShotArgs(str(tmp_path / "classes.txt"), top_k=9),
        )  # fmt: skip


def test_precision_plugin_runs_through_predict(tmp_path, tiny_config, tiny_checkpoint, image_folder):
    data = DataArgs(format="folder", source=str(image_folder), num_workers=0)
    runs = {}
    for precision in ("32-true", "bf16-mixed", "auto"):
        out = tmp_path / precision
        setup(
            model=ModelArgs(config=str(tiny_config), pretrained=str(tiny_checkpoint)),
            data=data,
            output=OutputArgs(dir=str(out), dtype="float32"),
            accelerator="cpu",
            precision=precision,
        )
        runs[precision] = read_output(out)[0].astype(np.float64)
        recorded = json.loads((out / "run.json").read_text())["fingerprint"]["precision"]
        assert recorded == ("32-true" if precision == "auto" else precision)  # auto is 32-true on a CPU
    assert np.all((runs["32-true"] * runs["bf16-mixed"]).sum(-1) > 0.99)
    np.testing.assert_array_equal(runs["32-true"], runs["auto"])


def test_a_resumed_run_spreads_the_shards_left_over_every_rank():
    """After a node died, the shards left are those of its ranks: they are split again over all ranks,
    from rank 0's view of the done shards, instead of waiting on the ranks that lost them."""
    from types import SimpleNamespace

    from clip_fabric.data import chunk
    from clip_fabric.predict import _shards
    from clip_fabric.strategies import hooks

    source = SimpleNamespace(shards=lambda: chunk(80, 10, "list"))  # 8 shards
    lost = {1, 3, 5, 7}  # rank 1's shards under the first run's split over 2 ranks
    folder = SimpleNamespace(done_shards=lambda: {i: {} for i in range(8) if i not in lost})
    mine = {}
    for rank in range(2):
        fabric = SimpleNamespace(
            global_rank=rank, world_size=2, broadcast=lambda obj, src: sorted(set(range(8)) - lost)
        )
        shards, todo, left = _shards(source, folder, hooks("auto"), fabric)
        mine[rank] = [s.index for s in todo]
    assert len(shards) == 8 and left == 40
    assert mine == {0: [1, 5], 1: [3, 7]}
