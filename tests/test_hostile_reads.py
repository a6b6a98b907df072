"""Issue 27: no read hangs or grows without bound. ``file://`` is a local path (a FIFO or a device is
refused before it is read), and every read of a sample stops at ``--data.max_image_bytes``."""

from __future__ import annotations

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
from conftest import jpeg_bytes

from clip_fabric.config import DataArgs
from clip_fabric.data import Shard
from clip_fabric.data.files import FileListSource, read_url
from clip_fabric.data.folder import FolderSource


def in_thread(fn, timeout: float = 20):
    """``fn()``'s result, or a failure if it has not returned within ``timeout`` (a hang)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert result, f"still reading after {timeout} s"
    return result[0]


def test_file_urls_are_local_paths_with_their_checks(tmp_path):
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "ok.jpg").write_bytes(jpeg_bytes(0, (8, 8)))
    rows = [f"file://{tmp_path}/fifo.jpg", "file:///dev/zero", f"file://{tmp_path}/ok.jpg"]
    path = tmp_path / "list.csv"
    pd.DataFrame({"url": rows}).to_csv(path, index=False)
    source = FileListSource(str(path), 10)
    fifo, zero, ok = in_thread(lambda: list(source.samples(Shard(0, "x", 0, 3))))
    assert fifo.error == f"unreadable file {tmp_path}/fifo.jpg: not a regular file but a FIFO"
    assert zero.error == "unreadable file /dev/zero: not a regular file but a character device"
    assert ok.error is None and ok.image == jpeg_bytes(0, (8, 8))


def test_local_files_and_sidecars_over_the_byte_cap_are_recorded_unread(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    big, small = jpeg_bytes(1, (200, 200)), jpeg_bytes(2, (4, 4))
    limit = len(small) + 10
    (root / "big.jpg").write_bytes(big)
    (root / "small.jpg").write_bytes(small)
    (root / "long.jpg").write_bytes(small)
    (root / "long.txt").write_bytes(b"x" * (limit + 1))
    samples = {s.key: s for s in FolderSource(str(root), 10, max_bytes=limit).samples(Shard(0, "r", 0, 3))}
    assert samples["big.jpg"].error == (
        f"unreadable file {root / 'big.jpg'}: {len(big):,} bytes is over --data.max_image_bytes "
        f"{limit:,}: not read (raise it, or null for no limit)"
    )
    assert (
        "long.txt" in samples["long.jpg"].error and "over --data.max_image_bytes" in samples["long.jpg"].error
    )
    assert samples["small.jpg"].error is None and samples["small.jpg"].image == small
    listed = tmp_path / "list.txt"
    listed.write_text(f"{root}/big.jpg\nfile://{root}/small.jpg\n")
    big_row, small_row = FileListSource(str(listed), 10, max_bytes=limit).samples(Shard(0, "x", 0, 2))
    assert "over --data.max_image_bytes" in big_row.error and small_row.image == small


def test_the_byte_cap_has_a_default_and_is_checked():
    assert DataArgs().max_image_bytes == 256 << 20
    with pytest.raises(ValueError, match="--data.max_image_bytes must be >= 1 or null"):
        DataArgs(max_image_bytes=0)


class Endless(BaseHTTPRequestHandler):
    """A body with no length that never ends (until the client goes)."""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        block = b"\xff" * 65536
        try:
            while True:
                self.wfile.write(block)
        except OSError:
            pass

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def test_an_endless_http_body_is_cut_at_the_byte_cap(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/endless.jpg"
        started = time.monotonic()
        data, reason = in_thread(lambda: read_url(url, 1 << 20), timeout=25)
        assert data is None and "over --data.max_image_bytes 1,048,576" in reason
        assert time.monotonic() - started < 20  # not the 30 s timeout
    finally:
        server.shutdown()


def test_a_tar_member_over_the_byte_cap_is_its_samples_error_unread(tmp_path):
    """A member's header says its size: one over the cap is skipped, not read into memory."""
    from conftest import write_tar

    from clip_fabric.data.wds import WebDatasetSource

    small, big = jpeg_bytes(0, (4, 4)), jpeg_bytes(1, (200, 200))
    path = write_tar(tmp_path / "t.tar", [{"__key__": "a", "jpg": big, "txt": b"x"},
                                          {"__key__": "b", "jpg": small, "txt": b"y"}])  # fmt: skip
    limit = len(small) + 10
    a, b = WebDatasetSource([str(path)], max_bytes=limit).samples(Shard(0, str(path)))
    assert a.error == (
        f"tar member a.jpg ({len(big):,} bytes) is over --data.max_image_bytes {limit:,}: not read "
        "(raise it, or null for no limit)"
    )
    assert b.error is None and b.image == small and b.caption == "y"


def test_a_member_over_the_byte_cap_fails_only_a_sample_that_reads_it(tmp_path):
    """Text mode reads no image, and a large member the sample is not read for (.npy) is left unread."""
    from conftest import write_tar

    from clip_fabric.data.wds import WebDatasetSource

    small, big = jpeg_bytes(0, (4, 4)), jpeg_bytes(1, (200, 200))
    samples = [
        {"__key__": "a", "jpg": big, "txt": b"x"},
        {"__key__": "b", "jpg": small, "npy": big, "txt": b"y"},
    ]
    path = write_tar(tmp_path / "t.tar", samples)
    limit = len(small) + 10
    a, b = WebDatasetSource([str(path)], text_only=True, max_bytes=limit).samples(Shard(0, str(path)))
    assert (a.error, a.caption, b.error, b.caption) == (None, "x", None, "y")
    a, b = WebDatasetSource([str(path)], max_bytes=limit).samples(Shard(0, str(path)))
    assert "a.jpg" in a.error and b.error is None and b.image == small
