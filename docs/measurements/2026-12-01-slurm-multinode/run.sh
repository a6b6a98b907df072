#!/usr/bin/env bash
# One run of tests/test_slurm_multinode.py with the job logs kept, condensed into log.txt beside this file:
# per job its nodes, ranks, doctor's table, rows, the requeue, the killed node. Run from anywhere as root,
# with the project's environment active:  bash docs/measurements/2026-12-01-slurm-multinode/run.sh
# (or  run.sh /tmp/slurm-multinode-XXXX  to condense an earlier run's logs again)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../../.."
if [[ $# -eq 1 ]]; then  # condense an earlier run's folder again
    base="$1"
else
    base="$(mktemp -d /tmp/slurm-multinode-XXXX)"
    python -m pytest -q -p no:cacheprovider tests/test_slurm_multinode.py --basetemp "$base/tmp" --durations=0 \
        -rA > "$base/pytest.txt" 2>&1 || true
fi
python - "$base" > "$here/log.txt" <<'PY'
import platform, re, subprocess, sys, time
from pathlib import Path

base = Path(sys.argv[1])
noise = re.compile(r"socket\.cpp|PRETRAINED|No pretrained weights|^-{20,}$|^\s*$")
progress = re.compile(r"embedding \d+ shards: [^\r]*?(\]|$)")  # rank 0's progress bar, redrawn after \r
print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.node()} kernel {platform.release()}; "
      f"{subprocess.run(['slurmd', '-V'], capture_output=True, text=True).stdout.strip()}; "
      f"{len(__import__('os').sched_getaffinity(0))} CPUs")
print("cluster: ctl 10.213.20.1 (slurmctld, bridge); node1 .11, node2 .12, node3 .13 (slurmd each), "
      "one network+UTS namespace per host\n")
for test in sorted(p for p in (base / "tmp").iterdir() if p.name.startswith("test_") and not p.is_symlink()):
    for log in sorted(test.glob("*.out")):
        print(f"===== {test.name.rstrip('0')}: {log.name}")
        for line in log.read_bytes().decode(errors="replace").split("\n"):  # "\r" stays inside a line
            label, rest = re.match(r"(\d+: )?(.*)", line, re.S).groups()  # srun --label's "rank: "
            rest = progress.sub("", rest).replace("\r", "")
            if not noise.search(rest):
                print(f"{label or ''}{rest}"[:300])
        print()
text = (base / "pytest.txt").read_text()
print("===== pytest")
for line in text.splitlines():
    if re.search(r"killed node2|^\d+\.\d+s (call|setup|teardown)|passed|failed|skipped", line):
        print(line[:300])
PY
echo "wrote $here/log.txt (pytest output and job logs in $base)"
