"""Mutation testing of the method's code with mutmut: which small bugs would the tests miss?

mutmut rewrites each function of the modules below into many mutants (an operator, a constant,
an argument changed) and runs, for each mutant, only the tests that call that function (it
records which tests reach which function in one clean pass first). A mutant is *killed* when a
test fails, *survived* when every test passes, *timeout* when the tests overrun their CPU-time
limit (a mutant that loops). Survivors are either killed by a new test or explained as
equivalent in the README ("Mutation testing").

The tests are the unit tests of these modules only (no CLI, subprocess, dask or browser
tests, see MODULES), one torch thread, one mutant at a time: this is a bench script for a
shared machine, not a CI step. Each module's work folder (under /tmp/ddpmseg-mutation) is a
copy of ddpmseg/ and tests/ that mutmut rewrites; results are kept there, so a second run only runs
the mutants not yet tried (--fresh starts over).

    pip install -e '.[mutation]'
    python bench/mutation.py [--modules voting,classifier/model] [--limit N] [--fresh]

--limit N runs at most N mutants per module, a fixed random sample (seed 0) of those not yet
tried. Prints one table (module, mutants, tried, killed, survived, timeout, no tests) and the
surviving mutants' diffs, and writes bench/results/mutation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Module -> (file, its unit tests). Modules in the order they matter: the ETF matrix and the
# training loop, the sampler and the pixel gather (coverage), the votes, then evaluation and
# the rest of classifier/. Each module runs in its own work folder with only its own tests:
# mutmut then runs, per mutant, those of them that reach the mutated function. Left out
# everywhere: tests that start processes or a dask cluster (DESELECT), the label loop.
FIT = "tests/classifier/test_classifier_fit.py"
MODULES = {
    "classifier/model": ("ddpmseg/classifier/model.py", [
        "tests/classifier/test_classifier_model.py", "tests/classifier/test_model_mutants.py"]),
    "classifier/train": ("ddpmseg/classifier/train.py", [
        FIT, "tests/classifier/test_train_mutants.py"]),
    "classifier/sampler": ("ddpmseg/classifier/sampler.py", [
        "tests/classifier/test_classifier_sampler.py",
        "tests/classifier/test_sampler_mutants.py"]),
    "featcache/pixels": ("ddpmseg/featcache/pixels.py", [
        "tests/featcache/test_fc_pixels.py", "tests/featcache/test_pixels_mutants.py",
        "tests/classifier/test_classifier_sampler.py"]),
    "voting": ("ddpmseg/voting.py", ["tests/test_voting.py", "tests/test_voting_mutants.py"]),
    "evaluate": ("ddpmseg/evaluate.py", [
        "tests/test_evaluate.py", "tests/test_evaluate_mutants.py"]),
    "classifier/ensemble": ("ddpmseg/classifier/ensemble.py", [
        FIT, "tests/classifier/test_run_integrity.py"]),
    "classifier/run": ("ddpmseg/classifier/run.py", [
        "tests/classifier/test_run_integrity.py", FIT]),
    "classifier/reference": ("ddpmseg/classifier/reference.py", [
        "tests/classifier/test_reference.py"]),
}
DESELECT = [
    FIT + "::test_resume_after_sigkill_matches_an_uninterrupted_run",
    FIT + "::test_dask_members_equal_sequential",
]

# mutmut's exit codes -> our columns (mutmut.stats.status_by_exit_code, summarised).
STATUS = {1: "killed", 3: "killed", 0: "survived", 33: "no tests", 5: "no tests",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          -9: "timeout"}


def work_of(work: Path, module: str) -> Path:
    return work / module.replace("/", "-")


def mutmut_config(module: str) -> str:
    """The [tool.mutmut] table appended to the work copy's pyproject.toml."""
    path, tests = MODULES[module]
    selection = tests + [f"--deselect={t}" for t in DESELECT if t.split("::")[0] in tests]
    return "\n".join([
        "", "[tool.mutmut]",
        'source_paths = ["ddpmseg"]',
        f"only_mutate = {json.dumps([path])}",
        f"pytest_add_cli_args_test_selection = {json.dumps(selection)}",
        # torch is not fork-safe after use: fork each mutant from a clean server process.
        'process_isolation = "forkserver"',
        # A mutant's CPU-time limit: (its tests' clean time + 2 s) x 5 x 2.
        "timeout_multiplier = 5.0", "timeout_constant = 2.0",
        "use_git_change_detection = false", "",
    ])


def prepare_work(work: Path, module: str, fresh: bool, tests_from: Path | None) -> None:
    """Copy ddpmseg/, tests/ (then TESTS_FROM's tests/ over them) and the config into WORK."""
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "ddpmseg", work / "ddpmseg", dirs_exist_ok=True, ignore=ignore)
    if (work / "tests").exists():
        shutil.rmtree(work / "tests")
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    if tests_from is not None:
        shutil.copytree(tests_from / "tests", work / "tests", dirs_exist_ok=True, ignore=ignore)
    pyproject = (ROOT / "pyproject.toml").read_text()
    (work / "pyproject.toml").write_text(pyproject + mutmut_config(module))


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    e.pop("CI", None)
    return e


GENERATE = """
from mutmut.__main__ import (copy_src_dir, copy_also_copy_files, setup_source_paths,
                             create_mutants, set_mutant_under_test)
set_mutant_under_test("mutant_generation")
copy_src_dir(); copy_also_copy_files(); setup_source_paths(); create_mutants(1)
"""


def generate(work: Path) -> None:
    subprocess.run([sys.executable, "-c", GENERATE], cwd=work, env=env(), check=True,
                   stdout=subprocess.DEVNULL)


def results(work: Path, module: str) -> dict[str, int | None]:
    meta = work_of(work, module) / "mutants" / (MODULES[module][0] + ".meta")
    return json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}


def changed_lines(work: Path, module: str) -> dict[str, str]:
    """Mutant name -> the source lines it changes, read from mutmut's mutated file (each mutant
    is a copy of its function named <function>__mutmut_<n>, beside <function>__mutmut_orig)."""
    text = (work / "mutants" / MODULES[module][0]).read_text()
    bodies = {}
    for m in re.finditer(r"^( *)def (x\S*?__mutmut_(\w+))\(.*?(?=^\1(?:def |class |\S)|\Z)", text,
                         re.M | re.S):
        bodies[m.group(2)] = m.group(0).splitlines()[1:]
    out = {}
    for name, body in bodies.items():
        orig = bodies.get(name.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
        if orig is not None and body is not orig:
            out[name] = "\n".join(line for line in body if line not in orig)
    return out


def run_mutants(work: Path, names: list[str]) -> None:
    """mutmut run on these mutants, one at a time; its output goes to WORK/mutmut.log."""
    if not names:
        return
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", "1", *names]
    with open(work / "mutmut.log", "a") as log:
        subprocess.run(cmd, cwd=work, env=env(), stdout=log, stderr=log, check=False)


def function_of(name: str) -> str:
    """'ddpmseg.outputs.voting.x_vote__mutmut_3' -> 'vote'; a method's: 'PixelIndex.from_store'."""
    base = name.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[1]  # x_vote, xǁPixelIndexǁfrom_store
    if "ǁ" in base:
        _, cls, method = base.split("ǁ")
        return f"{cls}.{method}"
    return base[2:]


def diff(work: Path, name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work, env=env(),
                         capture_output=True, text=True)
    return "\n".join(out.stdout.splitlines()[1:]).strip()


def summarise(work: Path, module: str) -> dict:
    codes = results(work, module)
    row = {"module": module, "mutants": len(codes), "tried": 0, "killed": 0, "survived": 0,
           "timeout": 0, "no tests": 0, "other": 0, "survivors": {}}
    for name, code in codes.items():
        if code is None:
            continue
        row["tried"] += 1
        status = STATUS.get(code, "other")
        row[status] += 1
        if status == "survived":
            row["survivors"][name] = diff(work_of(work, module), name)
    return row


def table(rows: list[dict]) -> str:
    cols = ["module", "mutants", "tried", "killed", "survived", "timeout", "no tests"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", default=",".join(MODULES),
                    help=f"comma-separated, from: {', '.join(MODULES)}")
    ap.add_argument("--limit", type=int, default=None,
                    help="at most N mutants per module (a fixed random sample)")
    ap.add_argument("--functions", default="",
                    help="comma-separated name patterns (vote, PixelIndex.*): only these")
    ap.add_argument("--touching", default="",
                    help="only mutants whose changed line contains this text (e.g. etf)")
    ap.add_argument("--rerun-survivors", action="store_true",
                    help="run only the surviving (and untested) mutants again, after adding tests")
    ap.add_argument("--tests-from", type=Path, default=None,
                    help="another checkout whose tests/ are laid over this one's (a branch's "
                         "new tests before it is merged)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ddpmseg-mutation"))
    ap.add_argument("--fresh", action="store_true", help="forget earlier results")
    ap.add_argument("--report-only", action="store_true", help="run nothing, print the table")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mutation.json")
    args = ap.parse_args(argv)
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    functions = [f.strip() for f in args.functions.split(",") if f.strip()]
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        ap.error(f"unknown module {', '.join(unknown)}; choose from {', '.join(MODULES)}")

    start = time.time()
    if not args.report_only:
        for m in modules:
            work = work_of(args.work, m)
            prepare_work(work, m, args.fresh, args.tests_from)
            generate(work)
            wanted = (0, 33) if args.rerun_survivors else (None,)  # 33: no test reached it
            budget = args.limit
            # A second pass runs what mutmut forgot meanwhile (it resets every result when the
            # test selection changed since the last run).
            for _ in range(1 if args.rerun_survivors else 2):
                todo = sorted(k for k, v in results(args.work, m).items() if v in wanted
                              and (not functions
                                   or any(fnmatch(function_of(k), f) for f in functions)))
                if args.touching:
                    lines = changed_lines(work, m)
                    todo = [k for k in todo
                            if args.touching in lines.get(k.split(".")[-1], "")]
                if budget is not None and len(todo) > budget:
                    todo = sorted(random.Random(0).sample(todo, budget))
                if not todo:
                    break
                print(f"{m}: running {len(todo)} mutants", file=sys.stderr, flush=True)
                run_mutants(work, todo)
                wanted = (None,)
                if budget is not None:
                    budget -= len(todo)

    rows = [summarise(args.work, m) for m in modules]
    print(table(rows))
    for r in rows:
        for name, d in r["survivors"].items():
            print(f"\nsurvived: {name}\n{d}")
    machine = f"{platform.node()}, {platform.processor() or platform.machine()}, " \
              f"{os.cpu_count()} cores (shared)"
    print(f"\none torch thread, one mutant at a time; {machine}; "
          f"{time.time() - start:.0f} s", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "tool": "mutmut", "threads": 1, "machine": machine, "limit": args.limit,
        "tests_from": str(args.tests_from or ROOT), "deselected": DESELECT,
        "rows": [dict(r, tests=MODULES[r["module"]][1]) for r in rows]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
