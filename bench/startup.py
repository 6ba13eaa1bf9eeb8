"""Start-up time of each command, before and after a change, as a ratio.

For each command: ``ddpmseg X --help``, and ``ddpmseg X`` on a missing input, timed until its
first line of output (the one-line error), as a user waits for it. Also ``ddpmseg --help``.
The two executables (two installs of ddpmseg, each in its own virtual environment) are
alternated run by run, so a busy machine slows both alike; each case reports the min and the
median of N runs, and the ratio before/after of the medians.

    python bench/startup.py BEFORE_DDPMSEG AFTER_DDPMSEG [--repeat 5] [--out FILE]
    python bench/startup.py /work/wt/before/.venv/bin/ddpmseg .venv/bin/ddpmseg

One torch thread (OMP_NUM_THREADS=1) and the machine are written into the JSON
(bench/results/startup.json by default) beside the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "startup.json"

# A command line per command that fails at once on a missing input (MISSING), writing nothing;
# OUT is a fresh folder for commands whose output folder is an argument.
FAILING = {
    "extract": ["MISSING", "OUT/s.zarr", "--num-classes", "2"],
    "fit": ["MISSING", "OUT/run"],
    "predict": ["MISSING", "MISSING", "OUT/pred"],
    "evaluate": ["MISSING", "MISSING"],
    "report": ["MISSING"],
    "suggest": ["MISSING", "MISSING", "--out", "OUT/suggest"],
    "sweep": ["MISSING", "MISSING", "--out", "OUT/sweep"],
    "verify": ["MISSING"],
    "check-checkpoint": ["MISSING"],
    "import-run": ["MISSING", "OUT/run", "--config", "MISSING"],
    "export-run": ["MISSING", "OUT/ref"],
    "train-backbone": ["MISSING", "OUT/bb", "--preset", "faces_64", "--minutes", "1"],
}
HELP = ["demo", *FAILING]


def first_line(argv: list[str], env: dict, cwd: Path) -> tuple[float, float, int, str]:
    """Seconds until the first line of output (stdout and stderr merged), seconds until exit,
    the exit code and that line; run in ``cwd`` (a scratch folder: nothing lands in a
    checkout, and no checkout in the working directory shadows the installed package)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, cwd=cwd, text=True)
    line = proc.stdout.readline()
    first = time.perf_counter() - start
    proc.stdout.read()
    code = proc.wait()
    return first, time.perf_counter() - start, code, line.rstrip("\n")


def cases(scratch: Path) -> dict[str, list[str]]:
    missing = str(scratch / "does-not-exist")
    out = {"--help": ["--help"]}
    out.update({f"{c} --help": [c, "--help"] for c in HELP})
    for command, args in FAILING.items():
        out[f"{command} (missing input)"] = [command] + [
            a.replace("MISSING", missing).replace("OUT", str(scratch / "out")) for a in args]
    return out


def measure(executables: dict[str, str], repeat: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in cases(Path(tmp)).items():
            times = {label: [] for label in executables}
            seen = {}
            for _ in range(repeat):
                for label, exe in executables.items():  # alternated, run by run
                    first, total, code, line = first_line([exe, *args], env, Path(tmp))
                    times[label].append(first)
                    seen[label] = {"exit_code": code, "first_line": line[:160]}
            row = {label: {"min_s": round(min(t), 3), "median_s": round(statistics.median(t), 3),
                           **seen[label]} for label, t in times.items()}
            row["ratio"] = round(row["before"]["median_s"] / row["after"]["median_s"], 1)
            rows[name] = row
            print(f"{name:32s} before {row['before']['median_s']:6.2f} s   after "
                  f"{row['after']['median_s']:6.2f} s   {row['ratio']:5.1f}x", flush=True)
    return rows


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="the ddpmseg executable of the version before")
    parser.add_argument("after", help="the ddpmseg executable of the version after")
    parser.add_argument("--repeat", type=int, default=5, help="runs per case and version")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    executables = {"before": args.before, "after": args.after}
    rows = measure(executables, args.repeat)
    result = {"what": "seconds from start to the first line of output (min and median of "
                      "N runs, the two versions alternated)",
              "executables": executables, "repeat": args.repeat, "torch_threads": 1,
              "machine": machine(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
