"""Instructions per request in the running servers, counted by valgrind (callgrind) under wrk.

    python -m bench.instructions [--seconds 10] [--rounds 2] [--connections 64]
    python -m bench.instructions --worker-source /tmp/other    # another checkout's `worker`

Each round starts the worker and the baseline (bench/run.py's servers: NOTIFY_SOCKET set, the
same config, the same event loop) under callgrind with counting off, warms each up with wrk,
then counts the user-space instructions the server runs while wrk posts sync `hello` tasks for
`--seconds`, and divides by the requests answered. The kernel's work (system calls) is not
counted.

CPU time per request moves with whatever else the machine runs; this count does not, to within
about 1 % between runs, so it shows a change of a few hundred nanoseconds a task where CPU time
cannot. Under valgrind a server runs some fifty times slower, so more requests arrive per turn
of its loop than at full speed: per-turn work weighs less here. docs/performance.md, "Issue #14,
tenth pass". Needs valgrind and wrk (Debian packages); 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import run

STARTUP_SECONDS = 120.0  # a server's start under valgrind, counting off


class Counted(run.Server):
    """A bench server run under callgrind, counting only between `count_on` and `counted`."""

    def __init__(self, kind: str, tmp: Path) -> None:
        super().__init__(kind, tmp, slots=100)
        self.ready_within = STARTUP_SECONDS
        self.out = tmp / f"callgrind-{kind}-{self.port}.out"

    def command(self, loop: str) -> list[str]:
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        return [*valgrind, f"--callgrind-out-file={self.out}", *super().command(loop)]

    def _control(self, *options: str) -> None:
        assert self.proc is not None
        subprocess.run(
            ["callgrind_control", *options, str(self.proc.pid)],
            capture_output=True,
            timeout=60,
            check=True,
        )

    def count_on(self) -> None:
        self._control("--instr=on")

    def counted(self) -> int:
        """Stop counting and return the instructions counted since `count_on`."""
        self._control("--instr=off")
        self._control("--dump")
        dump = Path(f"{self.out}.1")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if dump.exists():
                for line in dump.read_text(errors="replace").splitlines():
                    if line.startswith("totals:"):
                        return int(line.split()[1])
            time.sleep(0.2)
        raise run.BenchError(f"callgrind wrote no totals for the {self.kind} to {dump}")


def one_round(tmp: Path, loop: str, seconds: float, connections: int) -> dict[str, float]:
    """Instructions per request of each server, one after the other."""
    figures: dict[str, float] = {}
    for kind in ("worker", "baseline"):
        server = Counted(kind, tmp)
        try:
            server.start(loop)
            run.wrk(server.url, run.HELLO, connections, 2.0)  # warm: every path taken once
            server.count_on()
            done = run.wrk(server.url, run.HELLO, connections, seconds)
            figures[kind] = server.counted() / done["requests"]
            figures[f"{kind}_requests"] = done["requests"]
        finally:
            server.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="counted wrk run per server")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--worker-source", type=Path, help="measure the `worker` of this checkout (its root)"
    )
    args = parser.parse_args()
    missing = [tool for tool in ("valgrind", "callgrind_control", "wrk") if not shutil.which(tool)]
    if missing:
        print(f"bench.instructions: not installed: {', '.join(missing)}", file=sys.stderr)
        sys.exit(2)
    if args.worker_source:
        run.WORKER_SOURCE = args.worker_source.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-instr-") as directory:
        tmp = Path(directory)
        loop = run.detect_loop(tmp)
        print(f"event loop: {loop} (both servers); wrk -t1 -c{args.connections}, sync hello")
        print(f"{'round':>5}  {'worker':>9}  {'baseline':>9}  {'worker - baseline':>17}  ratio")
        for number in range(1, args.rounds + 1):
            figures = one_round(tmp, loop, args.seconds, args.connections)
            worker, baseline = figures["worker"], figures["baseline"]
            print(
                f"{number:>5}  {worker:>9,.0f}  {baseline:>9,.0f}  {worker - baseline:>17,.0f}"
                f"  {worker / baseline:.3f}   instructions a request "
                f"({figures['worker_requests']:.0f} and {figures['baseline_requests']:.0f} "
                "requests counted)",
                flush=True,
            )


if __name__ == "__main__":
    main()
