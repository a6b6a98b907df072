"""Where `predict` makes the host wait for the GPU: runs it with torch's CUDA sync debug mode on and
counts each synchronising call by its clip_fabric call site. A site counted once per batch stalls the
loop's overlap of decoding and encoding.

    HF_HUB_OFFLINE=1 python docs/measurements/2026-11-25-h100-overlap/syncs.py PREDICT_ARGS...
"""

from __future__ import annotations

import collections
import os
import sys
import traceback
import warnings

import torch

from clip_fabric.__main__ import main

hits: collections.Counter = collections.Counter()
_show = warnings.showwarning


def show(message, category, filename, lineno, file=None, line=None) -> None:
    if "synchroniz" not in str(message):
        return _show(message, category, filename, lineno, file, line)
    frames = [f for f in traceback.extract_stack() if f"{os.sep}clip_fabric{os.sep}" in f.filename]
    sites = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-3:])]
    hits[" <- ".join(sites)] += 1


if __name__ == "__main__":
    warnings.showwarning = show
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        main(sys.argv[1:])
    finally:
        print("host waits by call site (count):")
        for site, count in hits.most_common():
            print(f"{count:7d}  {site}")
