"""Fault harness: kill, corrupt and race ddpmseg's writers, and count what comes out.

Every fault ends in one of four ways:
  identical   the next command (a rerun, or ``--repair``) gave exactly the uncorrupted result
              (for a harmless flip: the data read back unchanged)
  refused     a one-line ``error: ...`` and a non-zero exit (and, for a damaged store or run,
              the repair the error names gave the uncorrupted result)
  silent      exit 0 with a result that differs from the uncorrupted one: must be 0
  traceback   a failure that was not one clear line: must be 0

Faults: SIGKILL/SIGINT of ``extract`` and ``fit`` at a random moment (from interpreter start
to the last write), a flipped byte in an activation/label chunk, in a ``complete`` flag chunk,
a flipped bit in a store's zarr.json (group or array), flipped bytes in a member file, two
writers into one store / run dir at once, and a full disk (a small tmpfs, mounted where the
harness may mount; skipped, saying why, where not).

    python bench/faults.py                 # the full run (README "Reliability")
    python bench/faults.py --quick         # a few of each (what the test suite runs)

Small data: the bundled faces at 64 px (3 training images), 2 steps x 2 blocks, 2 members of
1 epoch. Prints the table and writes bench/results/faults.json. Threads: 1 per process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from click.testing import CliRunner  # noqa: E402

from ddpmseg.bundled import DEMO_DATA  # noqa: E402
from ddpmseg.classifier import load_ensemble  # noqa: E402
from ddpmseg.cli.main import cli  # noqa: E402
from ddpmseg.errors import DdpmsegError  # noqa: E402
from ddpmseg.featcache import FeatureStore  # noqa: E402

OUTCOMES = ("identical", "refused", "silent", "traceback")
CLI = "from ddpmseg.cli.main import main; main()"
FULL = {"extract_kill": 50, "fit_kill": 20, "chunk_flip": 10, "flag_flip": 5,
        "meta_flip": 40, "member_flip": 10, "extract_pair": 10, "fit_pair": 10, "disk_full": 4}
QUICK = {"extract_kill": 2, "fit_kill": 1, "chunk_flip": 1, "flag_flip": 1, "meta_flip": 2,
         "member_flip": 1, "extract_pair": 1, "fit_pair": 0, "disk_full": 1}


class Harness:
    def __init__(self, work: Path, images: int, seed: int):
        self.work = work
        self.rng = random.Random(seed)
        self.data = work / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        for img in sorted(DEMO_DATA.joinpath("train").glob("*.png"))[:images]:
            shutil.copy(img, self.data / img.name)
            shutil.copy(img.with_suffix(".npy"), self.data / img.with_suffix(".npy").name)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.counts: dict[str, Counter] = {}
        self.examples: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self._n = 0

    # -- commands ---------------------------------------------------------------------------
    def extract_args(self, store, seed=0, *extra):
        return ["extract", str(self.data), str(store), "--config", "faces64_ffhq_34",
                "--steps", "50,150", "--blocks", "4,7", "--seed", str(seed), "--threads", "1",
                "--device", "cpu", "--no-progress", *extra]

    def fit_args(self, store, run, seed=0, *extra):
        return ["fit", str(store), str(run), "--ensemble", "2", "--max-epochs", "1", "--seed",
                str(seed), "--threads", "1", "--device", "cpu", "--no-progress", *extra]

    def inproc(self, args) -> tuple[int, str]:
        """Run a command in this process: (exit code, stderr); a traceback is code -999."""
        result = CliRunner().invoke(cli, ["-q", *args])
        err = result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            import traceback
            err += "Traceback\n" + "".join(traceback.format_exception(result.exception))
            return -999, err
        return result.exit_code, err

    def spawn(self, args) -> subprocess.Popen:
        # The console script when installed (a Ctrl-C during its imports is then handled as
        # a user's would be), else the same entry point through -c.
        script = Path(sys.executable).with_name("ddpmseg")
        cmd = [str(script)] if script.is_file() else [sys.executable, "-c", CLI]
        return subprocess.Popen([*cmd, "-q", *args], env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    def timed(self, args) -> float:
        t = time.perf_counter()
        p = self.spawn(args)
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"baseline command failed: {args}\n{err}")
        return time.perf_counter() - t

    def fresh(self, name: str) -> Path:
        self._n += 1
        return self.work / f"{name}_{self._n}"

    # -- results ----------------------------------------------------------------------------
    @staticmethod
    def store_digest(path) -> str:
        """sha256 over everything a reader of the store gets (raises on damage)."""
        store = FeatureStore.open(path)
        h = hashlib.sha256(json.dumps(store.info.to_json(), sort_keys=True).encode())
        if not store.complete().all():
            raise DdpmsegError("store incomplete")
        for i in range(len(store)):
            for m in store.maps(i):
                h.update(m.tobytes())
            h.update(store.labels(i).tobytes())
        return h.hexdigest()

    @staticmethod
    def run_digest(path) -> str:
        ens = load_ensemble(path, "cpu")
        h = hashlib.sha256(str(len(ens)).encode())
        for m in ens.members:
            for k, v in m.state_dict().items():
                h.update(k.encode() + v.cpu().numpy().tobytes())
        return h.hexdigest()

    def digest_or_none(self, fn, path):
        try:
            return fn(path)
        except DdpmsegError:
            return None

    @staticmethod
    def interrupted_cleanly(err: str) -> bool:
        """A Ctrl-C says one line (or nothing, when it lands before Python handles SIGINT)."""
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        return "Traceback" not in err and (not lines or lines[-1].startswith("error:"))

    @staticmethod
    def clear(code: int, err: str) -> bool:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        return code != 0 and "Traceback" not in err and bool(lines) and \
            lines[-1].startswith("error:")

    def record(self, kind: str, outcome: str, note: str = "") -> None:
        self.counts.setdefault(kind, Counter())[outcome] += 1
        if outcome in ("silent", "traceback") and kind not in self.examples:
            self.examples[f"{kind}/{outcome}"] = note[-2000:]

    # -- baselines --------------------------------------------------------------------------
    def baselines(self) -> None:
        self.store = self.work / "base.zarr"
        self.t_extract = self.timed(self.extract_args(self.store))
        self.run = self.work / "base_run"
        self.t_fit = self.timed(self.fit_args(self.store, self.run))
        self.base_store = {0: self.store_digest(self.store)}
        self.base_run = {0: self.run_digest(self.run)}

    def seed_baselines(self, store: bool, run: bool) -> None:
        """The results of the other seed of each concurrent pair."""
        if store:
            other = self.work / "base_seed1.zarr"
            code, err = self.inproc(self.extract_args(other, 1))
            assert code == 0, err
            self.base_store[1] = self.store_digest(other)
        if run:
            other = self.work / "base_run_seed100"
            code, err = self.inproc(self.fit_args(self.store, other, 100))
            assert code == 0, err
            self.base_run[100] = self.run_digest(other)

    # -- faults -----------------------------------------------------------------------------
    def kill(self, args, t_max: float, sig) -> tuple[int, str]:
        p = self.spawn(args)
        try:
            p.wait(timeout=self.rng.uniform(0, t_max))
        except subprocess.TimeoutExpired:
            p.send_signal(sig)
        _, err = p.communicate()
        return p.returncode, err

    def extract_kill(self) -> None:
        sig = self.rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGINT])
        store = self.fresh("kill.zarr")
        code, err = self.kill(self.extract_args(store), self.t_extract, sig)
        if sig == signal.SIGINT and code != 0 and not self.interrupted_cleanly(err):
            return self.record("extract_kill", "traceback", err)
        code, err = self.inproc(self.extract_args(store))
        self.settle("extract_kill", code, err, lambda: self.digest_or_none(
            self.store_digest, store) == self.base_store[0])

    def fit_kill(self) -> None:
        sig = self.rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGINT])
        run = self.fresh("kill_run")
        code, err = self.kill(self.fit_args(self.store, run), self.t_fit, sig)
        if sig == signal.SIGINT and code != 0 and not self.interrupted_cleanly(err):
            return self.record("fit_kill", "traceback", err)
        code, err = self.inproc(self.fit_args(self.store, run))
        stale = [p.name for p in run.glob(".*.tmp")]
        if stale:
            return self.record("fit_kill", "silent", f"stale temporary files {stale}")
        self.settle("fit_kill", code, err, lambda: self.digest_or_none(
            self.run_digest, run) == self.base_run[0])

    def settle(self, kind, code, err, same) -> None:
        if code == 0:
            self.record(kind, "identical" if same() else "silent", err)
        elif self.clear(code, err):
            self.record(kind, "refused", err)
        else:
            self.record(kind, "traceback", err)

    def _copy_store(self) -> Path:
        dst = self.fresh("flip.zarr")
        shutil.copytree(self.store, dst)
        return dst

    def _damaged_store(self, kind: str, store: Path, what: str) -> None:
        """After damage: reading must give the original data or an error; an error must be
        one line from the CLI (fit) and ``verify`` must list it; the repair the error
        names (extract --repair or --overwrite) must restore the original."""
        try:
            got = self.store_digest(store)
        except DdpmsegError:
            got = None
        except Exception as exc:  # noqa: BLE001 - a raw exception is a finding
            return self.record(kind, "traceback", f"{what}: {type(exc).__name__}: {exc}")
        if got is not None:
            return self.record(kind, "identical" if got == self.base_store[0] else "silent",
                               what)
        code, err = self.inproc(self.fit_args(store, self.fresh("flip_run")))
        if not self.clear(code, err):
            return self.record(kind, "traceback" if code != 0 else "silent", f"{what}: {err}")
        vcode, verr = self.inproc(["verify", str(store)])
        if vcode != 1:
            return self.record(kind, "traceback", f"{what}: verify exit {vcode}: {verr}")
        repair = "--overwrite" if "--overwrite" in err else "--repair"
        code, err = self.inproc(self.extract_args(store, 0, repair))
        if code != 0 or self.digest_or_none(self.store_digest, store) != self.base_store[0]:
            return self.record(kind, "traceback", f"{what}: repair {repair} failed: {err}")
        self.record(kind, "refused")

    @staticmethod
    def _chunks(store: Path, flags: bool) -> list[Path]:
        # Data chunks (maps, labels) or the complete flags. The writer records are neither: a
        # damaged one leaves what readers get intact, and verify and the next extract catch it
        # (tests/featcache/test_fc_writer.py).
        out = []
        for p in sorted(store.rglob("*")):
            parts = p.relative_to(store).parts
            if (p.is_file() and parts[1:2] == ("c",) and parts[0] != "writer"
                    and (parts[0] == "complete") == flags):
                out.append(p)
        return out

    def chunk_flip(self) -> None:
        store = self._copy_store()
        self._flip_byte("chunk_flip", store, self.rng.choice(self._chunks(store, False)))

    def flag_flip(self) -> None:
        store = self._copy_store()
        self._flip_byte("flag_flip", store, self.rng.choice(self._chunks(store, True)))

    def _flip_byte(self, kind, store, path) -> None:
        raw = bytearray(path.read_bytes())
        pos = self.rng.randrange(len(raw))
        raw[pos] ^= 1 << self.rng.randrange(8)
        path.write_bytes(bytes(raw))
        self._damaged_store(kind, store, f"{path.relative_to(store)} byte {pos}")

    def meta_flip(self) -> None:
        store = self._copy_store()
        path = self.rng.choice(sorted(store.rglob("zarr.json")))
        raw = bytearray(path.read_bytes())
        pos = self.rng.randrange(len(raw))
        raw[pos] ^= 1 << self.rng.randrange(8)
        path.write_bytes(bytes(raw))
        self._damaged_store("meta_flip", store, f"{path.relative_to(store)} byte {pos}")

    def member_flip(self) -> None:
        run = self.fresh("flip_run")
        shutil.copytree(self.run, run)
        member = self.rng.choice(sorted(run.glob("member_*.pt")))
        raw = bytearray(member.read_bytes())
        for _ in range(self.rng.choice([1, 8, 200])):
            raw[self.rng.randrange(len(raw))] ^= 1 << self.rng.randrange(8)
        member.write_bytes(bytes(raw))
        what = f"{member.name}"
        got = self.digest_or_none(self.run_digest, run)
        if got is not None:
            return self.record("member_flip", "identical" if got == self.base_run[0]
                               else "silent", what)
        code, err = self.inproc(["verify", str(run)])
        if code != 1:
            return self.record("member_flip", "traceback", f"{what}: verify {code} {err}")
        member.unlink()
        code, err = self.inproc(self.fit_args(self.store, run))
        if code != 0 or self.digest_or_none(self.run_digest, run) != self.base_run[0]:
            return self.record("member_flip", "traceback", f"{what}: refit failed {err}")
        self.record("member_flip", "refused")

    def _pair(self, kind, procs_args, seeds, digest, base, target) -> None:
        procs = [self.spawn(a) for a in procs_args]
        results = [(p.wait(), p.communicate()[1]) for p in procs]
        got = self.digest_or_none(digest, target)
        for (code, err), seed in zip(results, seeds):
            if code == 0 and got != base[seed]:
                return self.record(kind, "silent", f"seed {seed} exited 0, result differs")
            if code != 0 and not self.clear(code, err):
                return self.record(kind, "traceback", err)
        ok = [c for c, _ in results if c == 0]
        self.record(kind, "identical" if len(ok) == len(results) else "refused")

    def extract_pair(self) -> None:
        store = self.fresh("pair.zarr")
        self._pair("extract_pair", [self.extract_args(store, 0), self.extract_args(store, 1)],
                   [0, 1], self.store_digest, self.base_store, store)

    def fit_pair(self) -> None:
        run = self.fresh("pair_run")
        self._pair("fit_pair", [self.fit_args(self.store, run, 0),
                                self.fit_args(self.store, run, 100)],
                   [0, 100], self.run_digest, self.base_run, run)

    def disk_full(self) -> None:
        mnt = self.fresh("tmpfs")
        mnt.mkdir()
        size_kb = self.rng.choice([8, 64, 200, 400])
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                            str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            self.skipped["disk_full"] = f"cannot mount a tmpfs here ({r.stderr.strip()})"
            return
        try:
            store = mnt / "s.zarr"
            code, err = self.inproc(self.extract_args(store))
            if code == 0:
                same = self.digest_or_none(self.store_digest, store) == self.base_store[0]
                return self.record("disk_full", "identical" if same else "silent", err)
            if not self.clear(code, err):
                return self.record("disk_full", "traceback", err)
            subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
            code, err = self.inproc(self.extract_args(store))
            same = code == 0 and self.digest_or_none(self.store_digest, store) == \
                self.base_store[0]
            self.record("disk_full", "refused" if same else "traceback", err)
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)


def run(counts: dict, work: Path, images: int = 3, seed: int = 0) -> dict:
    h = Harness(work, images, seed)
    t0 = time.perf_counter()
    h.baselines()
    h.seed_baselines(bool(counts.get("extract_pair")), bool(counts.get("fit_pair")))
    for kind, n in counts.items():
        for _ in range(n):
            getattr(h, kind)()
            if kind in h.skipped:
                break
    table = {k: {o: int(h.counts.get(k, Counter())[o]) for o in OUTCOMES} for k in counts}
    for k in table:
        table[k]["injected"] = sum(table[k][o] for o in OUTCOMES)
    return {"table": table, "skipped": h.skipped, "examples": h.examples,
            "seconds": time.perf_counter() - t0,
            "baseline_seconds": {"extract": h.t_extract, "fit": h.t_fit},
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "threads": 1, "images": images, "seed": seed}


def format_table(result: dict) -> str:
    lines = ["| fault | injected | recovered identically | refused with a clear error | "
             "silently wrong | traceback |", "|---|---:|---:|---:|---:|---:|"]
    total = Counter()
    for kind, row in result["table"].items():
        lines.append(f"| {kind} | {row['injected']} | {row['identical']} | {row['refused']} | "
                     f"{row['silent']} | {row['traceback']} |")
        total.update(row)
    lines.append(f"| **all** | {total['injected']} | {total['identical']} | "
                 f"{total['refused']} | {total['silent']} | {total['traceback']} |")
    for kind, why in result["skipped"].items():
        lines.append(f"\n{kind} skipped: {why}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few faults of each kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--work", default=None, help="working folder [default: a temporary one]")
    ap.add_argument("--out", default=str(ROOT / "bench/results/faults.json"))
    a = ap.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="ddpmseg-faults-"))
    result = run(QUICK if a.quick else FULL, work, a.images, a.seed)
    print(format_table(result))
    print(f"\n{result['seconds']:.0f} s; baselines: extract {result['baseline_seconds']['extract']:.1f} s, "
          f"fit {result['baseline_seconds']['fit']:.1f} s (one process each, incl. start-up); "
          f"1 thread; {result['machine']}")
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
