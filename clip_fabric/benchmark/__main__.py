"""``python -m clip_fabric.benchmark KIND REQUEST.json RESULT.json``: one measurement process of the
benchmark command (``measure.py``). Users run ``python -m clip_fabric benchmark``."""

import sys

from clip_fabric.benchmark.measure import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
