"""The fast data path on the CPU: batched tensor preprocessing (the GPU decoder's code, run on the CPU),
scaled JPEG decoding, and the automatic batch size."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clip_fabric import encode
from clip_fabric.config import DataArgs, ModelArgs, OutputArgs
from clip_fabric.data import RawSample, Shard
from clip_fabric.data.balance import DecodeBalance
from clip_fabric.data.decode import CpuDecoder, ImageSpec, jpeg_header
from clip_fabric.data.device_decode import DeviceImageDecoder
from clip_fabric.data.stream import ShardStream
from clip_fabric.data.synthetic import synthetic_jpeg
from clip_fabric.encode import auto_batch_size
from clip_fabric.predict import setup
from tests.conftest import jpeg_bytes

PREPROCESS = open_clip.image_transform(224, is_train=False)


def encoded(size: tuple[int, int], mode: str = "RGB", fmt: str = "JPEG", **save) -> bytes:
    """A smooth picture (like a photo, unlike noise, so resampling filters compare fairly)."""
    image = Image.open(io.BytesIO(synthetic_jpeg(sum(size), size))).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


class ListSource:
    def __init__(self, samples: list[RawSample]) -> None:
        self._samples = samples

    def shards(self) -> list[Shard]:
        return [Shard(0, "list")]

    def samples(self, shard: Shard):
        yield from self._samples


def batches(samples: list[RawSample], decoder: CpuDecoder, gpu_jpeg: bool, batch_size: int = 16) -> list:
    stream = ShardStream(ListSource(samples), [Shard(0, "list")], decoder, batch_size, True, True, gpu_jpeg)
    return list(stream)


def test_spec_is_read_off_open_clip_preprocess():
    spec = ImageSpec.from_preprocess(PREPROCESS)
    assert spec.resize == 224 and spec.crop == (224, 224)
    assert spec.mean == open_clip.OPENAI_DATASET_MEAN and spec.std == open_clip.OPENAI_DATASET_STD
    squash = open_clip.image_transform(224, is_train=False, resize_mode="squash")
    assert ImageSpec.from_preprocess(squash) is None  # not reproduced: such models take the PIL path


def test_batched_tensor_path_matches_open_clip_preprocess():
    """Each kind of image lands on its own row, within a rounding step of open_clip's preprocess."""
    images = [
        encoded((500, 375)),
        encoded((1024, 768)),
        encoded((300, 400)),  # portrait
        encoded((224, 224)),  # no resize
        encoded((500, 375), mode="L"),  # greyscale JPEG, decoded to RGB
        encoded((500, 375), progressive=True),  # left to the CPU
        encoded((320, 240), fmt="PNG"),  # not a JPEG: the CPU
        encoded((500, 375)),  # two of one size are resized together
    ]
    samples = [RawSample(f"k{i}", data, f"caption {i}") for i, data in enumerate(images)]
    cpu = CpuDecoder(PREPROCESS, open_clip.get_tokenizer("ViT-B-32"), mode="pil")
    [reference] = batches(samples, cpu, gpu_jpeg=False)
    [packed] = batches(samples, cpu, gpu_jpeg=True)
    assert packed.jpegs.rows.tolist() == [0, 1, 2, 3, 4, 7] and packed.image_rows.tolist() == [5, 6]
    out = DeviceImageDecoder(cpu.spec, cpu, torch.device("cpu"))(packed)
    assert out.images.shape == reference.images.shape and out.jpegs is None
    diff = (out.images - reference.images).abs()
    # Normalised units: one uint8 step is about 0.015; torch's antialiased bicubic is PIL's filter.
    assert diff.mean() < 0.01, diff.mean()
    assert diff.amax(dim=(1, 2, 3)).max() < 0.2
    cos = torch.nn.functional.cosine_similarity(out.images.flatten(1), reference.images.flatten(1))
    assert cos.min() > 0.9999
    assert torch.equal(out.images[5:7], reference.images[5:7])  # the CPU rows untouched
    assert torch.equal(out.texts, reference.texts)


def test_jpeg_only_the_device_rejects_becomes_an_error_record():
    good = encoded((64, 48))
    broken = good[:200] + b"\x00" * (len(good) - 200)  # a header that parses, entropy data that does not
    samples = [RawSample("a", good, "one"), RawSample("b", broken, "two"), RawSample("c", good, "three")]
    cpu = CpuDecoder(PREPROCESS, open_clip.get_tokenizer("ViT-B-32"))
    assert jpeg_header(broken) is not None
    [packed] = batches(samples, cpu, gpu_jpeg=True)
    out = DeviceImageDecoder(cpu.spec, cpu, torch.device("cpu"))(packed)
    # Whether libjpeg refuses the file or pads it grey is its call; if it fails, the row moves to errors.
    kept = [r["key"] for r in out.rows]
    failed = [e["key"] for e in out.errors]
    assert sorted(kept + failed) == ["a", "b", "c"] and len(out.images) == len(kept) == len(out.texts)
    assert all(e["source"] == "list" and "undecodable" in e["reason"] for e in out.errors)


def test_truncated_batch_falls_back_one_image_at_a_time():
    good, other = encoded((64, 48)), encoded((80, 60))
    samples = [RawSample("a", good, "x"), RawSample("b", b"\xff\xd8\xff" + b"\x00" * 50, "y"),
               RawSample("c", other, "z")]  # fmt: skip
    cpu = CpuDecoder(PREPROCESS, open_clip.get_tokenizer("ViT-B-32"))
    [packed] = batches(samples, cpu, gpu_jpeg=True)
    # The header of "b" does not parse: the worker already recorded it; the others go on.
    assert [e["key"] for e in packed.errors] == ["b"]
    out = DeviceImageDecoder(cpu.spec, cpu, torch.device("cpu"))(packed)
    assert [r["key"] for r in out.rows] == ["a", "c"] and out.images.shape[0] == 2


def test_cpu_path_is_within_two_uint8_steps_of_pil_and_scales_large_jpegs():
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    pil, fast = CpuDecoder(PREPROCESS, tokenizer, mode="pil"), CpuDecoder(PREPROCESS, tokenizer, mode="cpu")
    scaled = CpuDecoder(PREPROCESS, tokenizer, mode="cpu", scale_jpegs=True)
    step = 1 / (255 * min(open_clip.OPENAI_DATASET_STD))  # one uint8 step, normalised
    for data in (encoded((400, 300)), encoded((300, 400), fmt="PNG"), encoded((120, 90), mode="L")):
        diff = (pil.image(data) - fast.image(data)).abs()
        assert diff.max() <= 2.01 * step and diff.mean() < 0.001, (diff.max(), diff.mean())
    large = encoded((1600, 1200))  # decoded at a DCT scale, then resized
    a, b = pil.image(large), scaled.image(large)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
    assert scaled._scaled_jpeg(large).shape[:2] == (300, 400)  # 1/4 scale: the short side stays >= 224
    assert (pil.image(large) - fast.image(large)).abs().max() <= 2.01 * step  # not scaled unless asked
    with pytest.raises(Image.DecompressionBombError):
        CpuDecoder(PREPROCESS, tokenizer, max_image_pixels=1000, mode="cpu", scale_jpegs=True).image(large)


def test_float_resize_branch_matches_the_uint8_one():
    """The GPU's branch (float, then rounded) against the CPU's uint8 kernel, on the CPU."""
    spec = ImageSpec.from_preprocess(PREPROCESS)
    image = torch.from_numpy(np.array(Image.open(io.BytesIO(encoded((500, 375)))))).permute(2, 0, 1)[None]
    exact, floated = spec.apply(image), spec.apply(image.float())
    assert exact.shape == floated.shape == (1, 3, 224, 224)
    assert (exact - floated).abs().max() <= 1.01 / (255 * min(spec.std))


def test_auto_batch_size_fills_free_memory_to_a_power_of_two(monkeypatch):
    assert auto_batch_size(lambda *a: None, lambda n: (), torch.device("cpu")) == encode.DEFAULT_BATCH_SIZE
    state = {"peak": 0}
    per_sample = 10 * 2**20  # 10 MiB of activations per sample

    def probe(images, texts):
        state["peak"] = len(images) * per_sample

    cuda = torch.cuda
    for name, value in {
        "synchronize": lambda *a: None,
        "reset_peak_memory_stats": lambda *a: None,
        "memory_allocated": lambda *a: 0,
        "memory_reserved": lambda *a: 0,
        "max_memory_allocated": lambda *a: state["peak"],
        "mem_get_info": lambda *a: (4 * 2**30, 80 * 2**30),  # 4 GiB free
    }.items():
        monkeypatch.setattr(cuda, name, value)
    device = torch.device("cuda")
    inputs = lambda n: (torch.zeros(n), None)  # noqa: E731
    # 0.7 x 4 GiB / 10 MiB = 286.7 -> 256
    assert auto_batch_size(probe, inputs, device) == 256
    # 6 MiB more per sample for the GPU decoder: 0.7 x 4 GiB / 16 MiB = 179 -> 128
    assert auto_batch_size(probe, inputs, device, extra_bytes_per_sample=6 * 2**20) == 128
    # Two devices (model_parallel): the one that needs more per sample decides.
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda d: state["peak"] * (4 if d.index == 1 else 1))
    pair = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert auto_batch_size(probe, inputs, pair) == 64  # 0.7 x 4 GiB / 40 MiB = 71.7 -> 64
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a: state["peak"])
    monkeypatch.setattr(cuda, "mem_get_info", lambda *a: (200 * 2**30, 200 * 2**30))
    assert auto_batch_size(probe, inputs, device) == 1024  # capped
    monkeypatch.setattr(cuda, "mem_get_info", lambda *a: (2**20, 2**30))
    assert auto_batch_size(probe, inputs, device) == 1


def test_predict_reports_batch_size_decode_latency(tmp_path, tiny_config, image_folder):
    summary = setup(
        model=ModelArgs(config=str(tiny_config)),
        data=DataArgs(format="folder", source=str(image_folder), num_workers=0, decode="cpu"),
        output=OutputArgs(dir=str(tmp_path / "out"), dtype="float32"),
        accelerator="cpu",
    )
    run = summary["this_run"]
    assert run["batch_size"] == encode.DEFAULT_BATCH_SIZE and run["decode"] == "cpu"
    assert run["batch_latency_ms"]["p50"] > 0 and run["peak_memory_gb"] is None
    assert run["steady_samples_per_s"] is None or run["steady_samples_per_s"] > 0
    assert summary["rows"] == 11


def test_decode_gpu_on_cpu_fails_before_work(tmp_path, tiny_config, image_folder):
    with pytest.raises(ValueError, match="--data.decode gpu needs"):
        setup(
            model=ModelArgs(config=str(tiny_config)),
            data=DataArgs(format="folder", source=str(image_folder), decode="gpu"),
            output=OutputArgs(dir=str(tmp_path / "out")),
            accelerator="cpu",
        )
    assert not (tmp_path / "out").exists()


def test_noise_jpeg_rows_keep_their_order_in_mixed_batches():
    """Rows decoded on either side come back in their original order (noise images tell them apart)."""
    images = [jpeg_bytes(i, (40 + i, 30), fmt="PNG" if i % 3 == 0 else "JPEG") for i in range(9)]
    samples = [RawSample(f"k{i}", data, f"c{i}") for i, data in enumerate(images)]
    cpu = CpuDecoder(PREPROCESS, open_clip.get_tokenizer("ViT-B-32"))
    reference = batches(samples, cpu, gpu_jpeg=False, batch_size=4)
    packed = batches(samples, cpu, gpu_jpeg=True, batch_size=4)
    decoder = DeviceImageDecoder(cpu.spec, cpu, torch.device("cpu"))
    for ref, pack in zip(reference, packed, strict=True):
        out = decoder(pack)
        assert [r["key"] for r in out.rows] == [r["key"] for r in ref.rows]
        cos = torch.nn.functional.cosine_similarity(out.images.flatten(1), ref.images.flatten(1))
        assert cos.min() > 0.99, cos
        # And each row is closer to its own reference than to any other row.
        sims = out.images.flatten(1) @ ref.images.flatten(1).T
        assert torch.equal(sims.argmax(1), torch.arange(len(out.rows)))
    assert np.isfinite(out.images.numpy()).all()


def test_cpu_decode_share_keeps_a_fixed_part_of_jpegs_on_the_cpu():
    samples = [RawSample(f"k{i}", encoded((64, 48)), f"c{i}") for i in range(12)]
    cpu = CpuDecoder(PREPROCESS, open_clip.get_tokenizer("ViT-B-32"))
    balance = DecodeBalance(0.25, workers=1)
    stream = ShardStream(ListSource(samples), [Shard(0, "list")], cpu, 16, True, True, True, balance=balance)
    for _ in range(2):  # the same JPEGs on every run
        [packed] = list(stream)
        assert packed.image_rows.tolist() == [3, 7, 11] and len(packed.jpegs.rows) == 9
        assert (packed.worker.decoded, packed.worker.rows) == (3, 12)
    with pytest.raises(ValueError, match="cpu_decode_share"):
        DataArgs(cpu_decode_share=1.5)
    assert DataArgs().cpu_decode_share == "auto"


def test_lifted_pixel_limit_lifts_pils_own(monkeypatch):
    """``--data.max_image_pixels null`` means no limit, PIL's default included."""
    data = encoded((320, 240))
    # As if PIL's default limit were small: 320x240 is past twice it (PIL's error), the 224x224 crop is not.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)
    for mode in ("pil", "cpu"):
        decoder = CpuDecoder(PREPROCESS, open_clip.get_tokenizer("ViT-B-32"), None, mode=mode)
        assert decoder.image(data).shape == (3, 224, 224)
        with pytest.raises(Image.DecompressionBombError):
            CpuDecoder(PREPROCESS, None, max_image_pixels=1000, mode=mode).image(data)
    assert jpeg_header(data).width == 320  # the header is read whatever PIL's limit
    assert Image.MAX_IMAGE_PIXELS == 30_000  # and PIL's setting is left as it was


def test_cpu_fallback_beside_the_gpu_decoder_does_not_scale():
    large = encoded((1600, 1200))
    decoder = CpuDecoder(PREPROCESS, None, mode="cpu", scale_jpegs=False)
    array = decoder._scaled_jpeg(large)
    assert array is None or array.shape[:2] == (1200, 1600)  # whole (simplejpeg) or left to PIL


def test_cpu_path_leaves_modes_whose_conversion_does_not_commute_to_open_clip():
    """Palette, alpha, 16-bit and CMYK images: open_clip resizes, then converts; its order is kept."""
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    pil, fast = CpuDecoder(PREPROCESS, tokenizer, mode="pil"), CpuDecoder(PREPROCESS, tokenizer, mode="cpu")
    rgb = Image.open(io.BytesIO(encoded((300, 200))))
    odd = [
        (rgb.convert("P"), "PNG"),
        (rgb.convert("RGBA"), "PNG"),
        (rgb.convert("CMYK"), "JPEG"),
        (Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), "PNG"),
    ]
    for image, fmt in odd:
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        assert torch.equal(pil.image(buf.getvalue()), fast.image(buf.getvalue())), image.mode


def test_cpu_path_batches_travel_as_uint8_and_normalise_to_the_same_bits():
    """For a GPU, the ``cpu`` path's batches cross from the workers as uint8 pixels (a quarter of
    float32's bytes); normalised on the device they are the model input that preprocessing in the worker
    makes, bit for bit. A batch where open_clip's own preprocess took a row (a palette PNG) travels as
    model input."""
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    cpu = CpuDecoder(PREPROCESS, tokenizer, mode="cpu", normalise_on_device=True)
    jpegs = [encoded((500, 375)), encoded((300, 400)), encoded((224, 224)), encoded((64, 48), mode="L")]
    samples = [RawSample(f"k{i}", d, "c") for i, d in enumerate(jpegs)]
    [batch] = batches(samples, cpu, gpu_jpeg=False)
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (4, 3, 224, 224)
    model_input = batch.to(torch.device("cpu"), cpu.spec.normalise).images
    assert model_input.dtype == torch.float32
    # A CPU run normalises in the workers instead: the same bits.
    [in_workers] = batches(samples, CpuDecoder(PREPROCESS, tokenizer, mode="cpu"), gpu_jpeg=False)
    assert in_workers.images.dtype == torch.float32 and torch.equal(in_workers.images, model_input)
    for row, data in zip(model_input, jpegs, strict=True):
        array = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
        in_worker = cpu.spec.apply(torch.from_numpy(array).permute(2, 0, 1)[None])[0]  # the old path
        assert torch.equal(row, in_worker) and torch.equal(row, cpu.image(data))
    with pytest.raises(ValueError, match="normalise"):
        batch.to(torch.device("cpu"))  # uint8 pixels are not model input

    buf = io.BytesIO()
    Image.open(io.BytesIO(jpegs[0])).convert("P").save(buf, format="PNG")
    mixed = [jpegs[0], buf.getvalue(), jpegs[1]]
    [batch] = batches([RawSample(f"k{i}", d, "c") for i, d in enumerate(mixed)], cpu, gpu_jpeg=False)
    assert batch.images.dtype == torch.float32
    assert torch.equal(batch.to(torch.device("cpu"), cpu.spec.normalise).images,
                       torch.stack([cpu.image(d) for d in mixed]))  # fmt: skip


def test_gpu_decoder_normalises_the_rows_the_cpu_path_decoded():
    """Beside the device decoder, rows left to the ``cpu`` path (progressive JPEG, PNG) arrive as uint8
    and take their place in the batch as model input, equal to that path's own."""
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    cpu = CpuDecoder(PREPROCESS, tokenizer, mode="cpu", normalise_on_device=True)
    images = [encoded((500, 375)), encoded((500, 375), progressive=True), encoded((320, 240), fmt="PNG")]
    samples = [RawSample(f"k{i}", data, f"caption {i}") for i, data in enumerate(images)]
    [packed] = batches(samples, cpu, gpu_jpeg=True)
    assert packed.images.dtype == torch.uint8 and packed.image_rows.tolist() == [1, 2]
    out = DeviceImageDecoder(cpu.spec, cpu, torch.device("cpu"))(packed)
    assert out.images.dtype == torch.float32
    assert torch.equal(out.images[1:], torch.stack([cpu.image(d) for d in images[1:]]))
    cos = torch.nn.functional.cosine_similarity(
        out.images[:1].flatten(1), cpu.image(images[0]).flatten()[None]
    )
    assert cos.item() > 0.9999


def test_auto_decode_is_gpu_only_where_it_was_measured(monkeypatch):
    from clip_fabric.data import device_decode
    from clip_fabric.data.paths import PATHS, resolve_decode

    cuda = torch.device("cuda", 0)
    available = {"yes": True}
    monkeypatch.setattr(device_decode, "gpu_decode_available", lambda device: available["yes"])
    library = {"name": "nvimgcodec"}
    monkeypatch.setattr(device_decode, "jpeg_library", lambda device: library["name"])
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    assert resolve_decode("auto", torch.device("cpu"), PREPROCESS) is PATHS["cpu"]
    assert resolve_decode("auto", cuda, PREPROCESS) is PATHS["gpu"]  # H100, H200 with nvImageCodec
    library["name"] = "torchvision"  # nvJPEG alone is not within 1e-5 on photos: the cpu path
    assert resolve_decode("auto", cuda, PREPROCESS) is PATHS["cpu"]
    library["name"] = "nvimgcodec"
    capability["value"] = (8, 0)
    assert resolve_decode("auto", cuda, PREPROCESS) is PATHS["cpu"]  # not measured there
    capability["value"], available["yes"] = (9, 0), False
    assert resolve_decode("auto", cuda, PREPROCESS) is PATHS["cpu"]  # a torchvision without nvJPEG
    with pytest.raises(ValueError, match="torchvision cannot decode JPEGs on this GPU"):
        resolve_decode("gpu", cuda, PREPROCESS)
    squash = open_clip.image_transform(224, is_train=False, resize_mode="squash")
    assert resolve_decode("auto", cuda, squash) is PATHS["pil"]
    assert resolve_decode("cpu", cuda, PREPROCESS).scales_jpegs and not PATHS["gpu"].scales_jpegs
    assert PATHS["gpu"].on_device and PATHS["gpu"].device_bytes_per_sample > 0
    assert not PATHS["none"].reads_images and PATHS["pil"].worker_mode == "pil"


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_device_batches_ship_uint8_to_a_device_and_float_to_the_cpu(device, monkeypatch):
    """predict's pipeline on the ``cpu`` path: to a device other than the CPU (``meta`` stands in for a
    GPU here) the workers' batches carry uint8 pixels and arrive as float32 model input there; a CPU run
    normalises in the workers."""
    from clip_fabric.data.batch import Batch
    from clip_fabric.data.paths import PATHS
    from clip_fabric.data.pipeline import device_batches
    from clip_fabric.data.synthetic import SyntheticSource
    from clip_fabric.modes import MODES

    crossed = []
    to = Batch.to
    monkeypatch.setattr(
        Batch, "to", lambda self, *a: crossed.append(getattr(self.images, "dtype", None)) or to(self, *a)
    )
    source = SyntheticSource(12, 6, (64, 48))
    data = DataArgs(format="synthetic", num_workers=1, batch_size=4)
    out = list(device_batches(source, source.shards(), PREPROCESS, open_clip.get_tokenizer("ViT-B-32"), data,
                              4, torch.device(device), PATHS["cpu"], MODES["image"]))  # fmt: skip
    shipped = torch.uint8 if device == "meta" else torch.float32
    assert set(crossed) - {None} == {shipped}
    assert all(b.images.dtype == torch.float32 and b.images.device.type == device for b in out if b.rows)
    assert sum(len(b.rows) for b in out) == 12


@pytest.mark.parametrize("library", ["nvimgcodec", "torchvision"])
def test_each_jpeg_library_matches_open_clip_on_varied_sizes(library):
    """Both decoders of the GPU path, on their CPU backends, against open_clip's preprocess."""
    if library == "nvimgcodec":
        pytest.importorskip("nvidia.nvimgcodec")
    sizes = [(500, 375), (37, 300), (300, 37), (16, 16), (640, 480), (333, 777)]
    images = [encoded(s) for s in sizes] + [encoded((200, 150), mode="L")]
    samples = [RawSample(f"k{i}", data, "c") for i, data in enumerate(images)]
    cpu = CpuDecoder(PREPROCESS, open_clip.get_tokenizer("ViT-B-32"), mode="pil")
    [reference] = batches(samples, cpu, gpu_jpeg=False)
    [packed] = batches(samples, cpu, gpu_jpeg=True)
    decoder = DeviceImageDecoder(cpu.spec, cpu, torch.device("cpu"), library=library)
    assert decoder.library == library
    out = decoder(packed)
    assert [r["key"] for r in out.rows] == [f"k{i}" for i in range(len(images))]
    cos = torch.nn.functional.cosine_similarity(out.images.flatten(1), reference.images.flatten(1))
    assert cos.min() > 0.9999, cos


def test_small_inputs_are_split_over_the_workers_and_come_back_in_shard_order():
    from clip_fabric.data.batch import Batch
    from clip_fabric.data.pipeline import in_shard_order, split_shards

    shards = [Shard(0, "a", 0, 1000), Shard(1, "b", 1000, 1100)]
    pieces = split_shards(shards, 8)
    assert [(p[0].index, p[0].start, p[0].stop, p[1], p[2]) for p in pieces[:4]] == [
        (0, 0, 250, 0, 4), (0, 250, 500, 1, 4), (0, 500, 750, 2, 4), (0, 750, 1000, 3, 4),
    ]  # fmt: skip
    assert [(p[0].start, p[0].stop) for p in pieces[4:]] == [(1000, 1100)]  # under 2 x MIN_PART: whole
    assert split_shards(shards, 2) == shards
    assert split_shards([Shard(0, "x.tar")], 8) == [Shard(0, "x.tar")]  # a tar's length is not known
    # Workers deliver parts interleaved; the writer sees each shard whole, in order, with one last.
    arrivals = [(0, 1, False), (0, 0, False), (0, 1, True), (0, 0, True), (0, 2, True), (0, 3, True)]
    batches = [Batch(s, "a", [{"key": f"{p}"}], last=last, part=p, parts=4) for s, p, last in arrivals]
    out = list(in_shard_order(batches))
    assert [(b.rows[0]["key"], b.last) for b in out] == [
        ("0", False), ("0", False), ("1", False), ("1", False), ("2", False), ("3", True),
    ]  # fmt: skip


def test_an_image_no_decoder_reads_is_recorded_without_a_bytesio_repr():
    """Before: ``cannot identify image file <_io.BytesIO object at 0x7f...>``, which names nothing."""
    samples = [RawSample("bad", b"not an image at all", "c"), RawSample("ok", encoded((64, 48)), "c")]
    cpu = CpuDecoder(PREPROCESS, open_clip.get_tokenizer("ViT-B-32"), mode="cpu")
    [batch] = batches(samples, cpu, gpu_jpeg=False)
    [error] = batch.errors
    assert error["key"] == "bad" and error["reason"].startswith("undecodable image: UnidentifiedImageError")
    assert "BytesIO" not in error["reason"] and "0x" not in error["reason"], error["reason"]


def test_a_large_shard_is_read_whole_however_many_workers():
    """Its later parts would wait in memory for its first: past SPLIT_AT_MOST samples it is not split."""
    from clip_fabric.data.pipeline import SPLIT_AT_MOST, split_shards

    big = [Shard(0, "a", 0, SPLIT_AT_MOST + 1)]
    assert split_shards(big, 16) == big
    assert len(split_shards([Shard(0, "a", 0, SPLIT_AT_MOST)], 16)) == 16


def test_nvimgcodec_that_raises_on_a_batch_decodes_its_images_one_at_a_time():
    """A file the library cannot parse must not cost the batch: each alone, the refused ones to the CPU."""
    pytest.importorskip("nvidia.nvimgcodec")
    from clip_fabric.data.device_decode import NvImageCodecJpegs

    jpegs = NvImageCodecJpegs(torch.device("cpu"))
    real = jpegs.decoder

    class RaisesOnBatches:
        def decode(self, codes, **kwargs):
            if isinstance(codes, list):
                raise RuntimeError("Could not parse input bitstream")
            return real.decode(codes, **kwargs)

    jpegs.decoder = RaisesOnBatches()
    good = np.frombuffer(encoded((64, 48)), dtype=np.uint8)
    out = jpegs([good, np.frombuffer(b"\xff\xd8\xff broken", dtype=np.uint8), good], None)
    assert out[0].shape == (3, 48, 64) and out[1] is None and torch.equal(out[0], out[2])


def test_an_unreadable_errors_file_does_not_cost_the_summary(tmp_path):
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clip_fabric.reasons import folder_reasons

    (tmp_path / "errors").mkdir()
    pq.write_table(
        pa.table({"reason": ["no caption", "no caption"]}), tmp_path / "errors" / "errors_0.parquet"
    )
    (tmp_path / "errors" / "errors_1.parquet").write_bytes(b"not parquet")
    reasons = folder_reasons(fsspec.filesystem("file"), str(tmp_path / "errors"))
    assert reasons and reasons[0][1] == 2
