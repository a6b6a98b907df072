"""Where a CLI run's time goes (docs/startup.md): importing clip_fabric's CLI, main() (parse, imports, the
command) and the interpreter's exit after it. Prints the moment main returned (wall clock) so the caller
can take the exit from its own clock:

    s=$(date +%s.%N); python timeline.py predict ARGS...; e=$(date +%s.%N)   # exit = e - END
"""

import sys
import time

started = time.perf_counter()
import clip_fabric.__main__ as cli  # noqa: E402

imported = time.perf_counter()
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
done = time.perf_counter()
took = f"import clip_fabric.__main__ {imported - started:.2f} s, main {done - imported:.2f} s"
print(took, file=sys.stderr)
print(f"END {time.time():.3f}", file=sys.stderr)
