"""Which nvImageCodec backends decode on this machine, where their output lives, and how fast.

python docs/measurements/2026-12-04-photo-speed/diag.py
"""

from __future__ import annotations

import time

import numpy as np
import torch

from clip_fabric.benchmark.shards import photo_size, synthetic_photo


def main() -> None:
    from nvidia import nvimgcodec as nv

    jpegs = [np.frombuffer(synthetic_photo(i, photo_size(i)), dtype=np.uint8) for i in range(256)]
    params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB)
    stream = torch.cuda.Stream()
    for name, kinds in (
        ("hw", [nv.HW_GPU_ONLY]),
        ("cuda", [nv.GPU_ONLY]),
        ("hybrid", [nv.HYBRID_CPU_GPU]),
        ("cpu", [nv.CPU_ONLY]),
        ("all", [nv.HW_GPU_ONLY, nv.GPU_ONLY, nv.HYBRID_CPU_GPU, nv.CPU_ONLY]),
    ):
        decoder = nv.Decoder(device_id=0, backends=[nv.Backend(k) for k in kinds])
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            codes = [nv.CodeStream(j) for j in jpegs]
            out = decoder.decode(codes, params=params, cuda_stream=stream.cuda_stream)
            returned = time.perf_counter() - start
            stream.synchronize()
            done = time.perf_counter() - start
        kinds_out = {str(o.buffer_kind) for o in out if o is not None}
        failed = sum(o is None for o in out)
        print(
            f"{name}: {len(jpegs) / done:.0f} images/s (call returned after {returned * 1e3:.1f} ms of "
            f"{done * 1e3:.1f}), buffers {kinds_out}, failed {failed}",
            flush=True,
        )


if __name__ == "__main__":
    main()
