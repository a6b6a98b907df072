#!/usr/bin/env bash
# One run of tests/test_slurm_multinode.py with the job logs kept, condensed into log.txt beside this file:
# per job its nodes, ranks, doctor's table, rows, the requeue, the killed node. Run from anywhere as root,
# with the project's environment active:  bash docs/measurements/2026-12-01-slurm-multinode/run.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../../.."
base="$(mktemp -d /tmp/slurm-multinode-XXXX)"
python -m pytest -q -p no:cacheprovider tests/test_slurm_multinode.py --basetemp "$base/tmp" --durations=0 \
    -rA > "$base/pytest.txt" 2>&1 || true
python - "$base" > "$here/log.txt" <<'PY'
import platform, re, subprocess, sys, time
from pathlib import Path

base = Path(sys.argv[1])
noise = re.compile(r"socket\.cpp|PRETRAINED|No pretrained weights|^-{20,}$|^\s*$|^embedding \d+ shards")
print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.node()} kernel {platform.release()}; "
      f"{subprocess.run(['slurmd', '-V'], capture_output=True, text=True).stdout.strip()}; "
      f"{len(__import__('os').sched_getaffinity(0))} CPUs")
print("cluster: ctl 10.213.20.1 (slurmctld, bridge); node1 .11, node2 .12, node3 .13 (slurmd each), "
      "one network+UTS namespace per host\n")
for test in sorted(p for p in (base / "tmp").iterdir() if p.name.startswith("test_") and not p.is_symlink()):
    for log in sorted(test.glob("*.out")):
        print(f"===== {test.name.rstrip('0')}: {log.name}")
        for line in log.read_text(errors="replace").splitlines():
            line = line.split("\r")[-1]  # a progress bar's last state
            if not noise.search(line):
                print(line[:300])
        print()
text = (base / "pytest.txt").read_text()
print("===== pytest")
for line in text.splitlines():
    if re.search(r"killed node2|^\d+\.\d+s (call|setup|teardown)|passed|failed|skipped", line):
        print(line[:300])
PY
echo "wrote $here/log.txt (pytest output and job logs in $base)"
