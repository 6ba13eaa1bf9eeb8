"""Fault harness: kill, corrupt and race ddpmseg's writers, and count what comes out.

Every fault ends in one of five ways:
  identical   the next command (a rerun, or ``--repair``) gave exactly the uncorrupted result
              (for a harmless flip: the data read back unchanged); per kind below
  refused     a one-line ``error: ...`` and a non-zero exit (and, for a damaged store or run,
              the repair the error names gave the uncorrupted result)
  silent      exit 0 with a result that differs from the uncorrupted one: must be 0
  traceback   a failure that was not one clear line: must be 0
  lost        data that was whole before the fault is gone (no command claimed success): must
              be 0

Faults: SIGKILL/SIGINT of ``extract`` and ``fit`` at a random moment (from interpreter start
to the last write), a flipped byte in an activation/label chunk, in a ``complete`` flag chunk,
a flipped bit in a store's zarr.json (group or array), flipped bytes in a member file, two
writers into one store / run dir at once, and a full disk (a small tmpfs, mounted where the
harness may mount). A kind that cannot run here (no tmpfs, no dask scheduler) is skipped,
saying why, and under CI=true fails the run instead (``unavailable``).

Round 2 (issue 22), and what "identical" means for each:
  tcp_orphan        a real ``dask scheduler`` and ``dask worker`` (2 threads) on 127.0.0.1;
                    extract of 8 images (seed 0, --images-per-batch 8: one task) through it, its
                    client SIGKILLed 0-3 s after the store appears, so that the task runs on;
                    at once ``extract --seed 1 --overwrite`` (image by image) into the same
                    store, through the scheduler (odd faults) or in one process (even).
                    Once the worker is idle:
                    identical = the rerun exited 0 and the store equals a clean seed-1
                    extraction (maps, labels, metadata); a refusal is one clear line
  symlink_alias     two writers started together, one through a symlink to the other's run
                    dir (fit, seeds 0 and 100; odd faults) or store (extract, seeds 0 and 1;
                    even): as for the pairs, the second must be refused; identical cannot
                    happen (both exiting 0 leaves one of them with another's result: silent)
  predict_kill      predict --vote hard SIGKILLed/SIGINTed over an earlier soft prediction in
                    OUT: every second fault the moment OUT first changes, the others at a
                    random moment. identical = OUT holds the earlier prediction byte for byte,
                    or the new one complete (as a clean predict elsewhere writes it, less
                    predict.json's out_dir, summary, palette and seconds); else lost
  evaluate_partial  what a predict killed part way leaves (the first k of n images' files,
                    palette.json, no summary.png or predict.json), given to evaluate: must be
                    refused; exit 0 is silent
  fit_enospc,       fit's run dir / predict's OUT on a tmpfs too small for it (5-90 % of
  predict_enospc    the result's size): refused = one ``error:`` line that names a path
                    under the tmpfs, and then the same command with room gives the
                    uninterrupted result (run: the members' weights; OUT: as in
                    predict_kill); an error line without the path counts as traceback
  exif_photo        a JPEG stored turned (EXIF Orientation 6, then 8, then 3) with the mask of
                    the upright picture, against the picture made upright by Pillow and saved
                    as a PNG: identical = extract gives the same maps and labels and predict
                    (from the image folder) the same label map for both; a refusal counts as
                    refused, though the photo is valid
  masks_named       masks as ``<id>_label.png``, as ``<id>_mask.jpg``, a mask with no image
                    (``ghost_mask.png``), an all-ignore mask (one case per fault, in turn):
                    identical = exit 0 and the store's maps and labels equal those of the
                    base store (same images, masks as <id>.npy; the first two cases);
                    refused = a one-line error, or exit 0 with a note on stderr naming each
                    such file (for all-ignore: the image) and "mask"; exit 0 without such a
                    note is silent

    python bench/faults.py                 # the full run (README "Reliability")
    python bench/faults.py --quick         # a few of each (what the test suite runs)
    python bench/faults.py --quick --only predict_kill,exif_photo

Small data: the bundled faces at 64 px (3 training images; tcp_orphan: all 8), 2 steps x 2
blocks, 2 members of 1 epoch. Prints the table and writes bench/results/faults.json (not with
--only, unless --out). Threads: 1 per process.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from click.testing import CliRunner  # noqa: E402

from ddpmseg.backbone.bundled import DEMO_DATA  # noqa: E402
from ddpmseg.classifier import load_ensemble  # noqa: E402
from ddpmseg.cli.main import cli  # noqa: E402
from ddpmseg.core.errors import DdpmsegError  # noqa: E402
from ddpmseg.featcache import FeatureStore  # noqa: E402

OUTCOMES = ("identical", "refused", "silent", "traceback", "lost")
CLI = "from ddpmseg.cli.main import main; main()"
FULL = {"extract_kill": 50, "fit_kill": 20, "chunk_flip": 10, "flag_flip": 5,
        "meta_flip": 40, "member_flip": 10, "extract_pair": 10, "fit_pair": 10, "disk_full": 4,
        "tcp_orphan": 6, "symlink_alias": 6, "predict_kill": 10, "evaluate_partial": 4,
        "fit_enospc": 4, "predict_enospc": 4, "exif_photo": 3, "masks_named": 8}
QUICK = {"extract_kill": 2, "fit_kill": 1, "chunk_flip": 1, "flag_flip": 1, "meta_flip": 2,
         "member_flip": 1, "extract_pair": 1, "fit_pair": 0, "disk_full": 1,
         "tcp_orphan": 1, "symlink_alias": 1, "predict_kill": 1, "evaluate_partial": 1,
         "fit_enospc": 1, "predict_enospc": 1, "exif_photo": 1, "masks_named": 1}


class Unavailable(RuntimeError):
    """A fault kind that cannot run on this machine, under CI=true (see ``unavailable``)."""


def unavailable(kind: str, why: str) -> str:
    """Why ``kind`` cannot run here, for the table's "skipped" lines. Under CI=true a skipped
    kind fails the run instead: a CI that passes without injecting a fault proves nothing."""
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        raise Unavailable(f"fault kind {kind} cannot run here under CI=true: {why}")
    return why


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
        self.pred = self.tcp_base = self.dask_address = None
        self.dask_procs: list[subprocess.Popen] = []
        self.tries: Counter = Counter()  # faults of each kind so far (kinds that alternate)

    # -- commands ---------------------------------------------------------------------------
    def extract_args(self, store, seed=0, *extra, data=None):
        return ["extract", str(data or self.data), str(store), "--config", "faces64_ffhq_34",
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
        # SIGINT's disposition is set, not inherited: under a parent that ignores it (a
        # background job) the Ctrl-C faults would land on nothing and count as recovered.
        return subprocess.Popen([*cmd, "-q", *args], env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

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
        if outcome in ("silent", "traceback", "lost") and \
                f"{kind}/{outcome}" not in self.examples:  # the first of each
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

    def settle(self, kind, code, err, same, note: str = "") -> None:
        """Classify one command's outcome by its exit code and stderr ``err``; ``note`` (what
        was tried) prefixes the example kept, never the stderr that is judged."""
        if code == 0:
            self.record(kind, "identical" if same() else "silent", note + err)
        elif self.clear(code, err):
            self.record(kind, "refused", note + err)
        else:
            self.record(kind, "traceback", note + err)

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
            self.skipped["disk_full"] = unavailable(
                "disk_full", f"cannot mount a tmpfs here ({r.stderr.strip()})")
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


    # -- round 2 (issue 22) -----------------------------------------------------------------
    def _mount(self, kind: str, size_kb: int) -> Path | None:
        """A small tmpfs for ``kind``, or None (recorded as skipped) where none can be mounted."""
        mnt = self.fresh("tmpfs")
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                            str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            self.skipped[kind] = unavailable(kind, f"cannot mount a tmpfs here "
                                                   f"({r.stderr.strip()})")
            return None
        return mnt

    @staticmethod
    def _size_kb(path: Path, rng: random.Random) -> int:
        """A tmpfs size that runs out part way through writing what ``path`` holds."""
        total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return max(4, int(total * rng.uniform(0.05, 0.9)) // 4096 * 4)

    def _enospc(self, kind, args, out, same) -> None:
        """Run ``args`` (writing ``out`` on a too small tmpfs), then again with room."""
        mnt = out.parent
        try:
            code, err = self.inproc(args)
            if code == 0:
                return self.record(kind, "identical" if same() else "silent", err)
            if not self.clear(code, err) or str(mnt) not in err.strip().splitlines()[-1]:
                return self.record(kind, "traceback", f"not one line naming {mnt}: {err}")
            subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
            code, err2 = self.inproc(args)
            ok = code == 0 and same()
            self.record(kind, "refused" if ok else "traceback",
                        err if ok else f"rerun with room: {err2}")
        finally:
            # Lazily: a command that failed in this process may still hold a file open there.
            subprocess.run(["umount", "--lazy", str(mnt)], capture_output=True)

    def fit_enospc(self) -> None:
        mnt = self._mount("fit_enospc", self._size_kb(self.run, self.rng))
        if mnt is not None:
            run = mnt / "run"
            self._enospc("fit_enospc", self.fit_args(self.store, run), run,
                         lambda: self.digest_or_none(self.run_digest, run) == self.base_run[0])

    def predict_enospc(self) -> None:
        self.prediction_baselines()
        mnt = self._mount("predict_enospc", self._size_kb(self.pred, self.rng))
        if mnt is not None:
            out = mnt / "pred"
            self._enospc("predict_enospc", self.predict_args(out), out,
                         lambda: self.folder_digest(out) == self.pred_digest["soft"])

    # predictions
    def predict_args(self, out, vote="soft", source=None):
        return ["predict", str(self.run), str(source or self.store), str(out), "--vote", vote,
                "--threads", "1", "--device", "cpu", "--no-progress"]

    @staticmethod
    def folder_files(folder: Path) -> dict:
        """Every file under ``folder`` and its bytes' sha256 (what "byte for byte" compares)."""
        if not folder.is_dir():
            return {}
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    @classmethod
    def folder_digest(cls, folder: Path) -> str:
        """A prediction folder's content, wherever and whenever it was written: the files'
        bytes, but predict.json without the entries that name OUT or time the run."""
        files = cls.folder_files(folder)
        if "predict.json" in files:
            meta = json.loads((folder / "predict.json").read_text())
            for key in ("out_dir", "summary", "palette", "seconds"):
                meta.pop(key, None)
            files["predict.json"] = json.dumps(meta, sort_keys=True)
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()

    def prediction_baselines(self) -> None:
        """A complete prediction of the base run (soft vote, and hard for a second one)."""
        if self.pred is not None:
            return
        self.pred = self.work / "base_pred_soft"
        self.t_predict = self.timed(self.predict_args(self.pred))  # the range of kill times
        hard = self.work / "base_pred_hard"
        code, err = self.inproc(self.predict_args(hard, "hard"))
        assert code == 0, err
        self.pred_digest = {"soft": self.folder_digest(self.pred),
                            "hard": self.folder_digest(hard)}

    def _changed(self, folder: Path, before: dict) -> bool:
        try:
            now = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}
        except OSError:
            return True
        return now != before

    def predict_kill(self) -> None:
        """A predict (hard vote) killed over an earlier prediction (soft vote) in OUT. Every
        second fault is killed the moment OUT first changes (where a predict that rewrites
        OUT in place is most exposed), the others at a random moment."""
        self.prediction_baselines()
        out = self.fresh("pred")
        shutil.copytree(self.pred, out)
        earlier = self.folder_files(out)
        stats = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()}
        sig = self.rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGINT])
        self.tries["predict_kill"] += 1
        p = self.spawn(self.predict_args(out, "hard"))
        if self.tries["predict_kill"] % 2:
            while p.poll() is None and not self._changed(out, stats):
                time.sleep(0.005)
            time.sleep(self.rng.uniform(0, 0.05))
            if p.poll() is None:
                p.send_signal(sig)
        else:
            try:
                p.wait(timeout=self.rng.uniform(0, self.t_predict))
            except subprocess.TimeoutExpired:
                p.send_signal(sig)
        _, err = p.communicate()
        if sig == signal.SIGINT and p.returncode != 0 and not self.interrupted_cleanly(err):
            return self.record("predict_kill", "traceback", err)
        new = self.folder_digest(out) == self.pred_digest["hard"]
        if p.returncode == 0:
            return self.record("predict_kill", "identical" if new else "silent", err)
        if new or self.folder_files(out) == earlier:
            return self.record("predict_kill", "identical")
        self.record("predict_kill", "lost",
                    f"{sig.name}: OUT holds {sorted(self.folder_files(out))}")

    def evaluate_partial(self) -> None:
        """What a predict killed part way leaves (the first k images' files, palette.json, no
        summary.png or predict.json), handed to evaluate."""
        self.prediction_baselines()
        out = self.fresh("partial")
        shutil.copytree(self.pred, out)
        names = json.loads((out / "predict.json").read_text())["names"]
        keep = self.rng.randrange(1, len(names) + 1)
        for name in names[keep:]:
            for f in out.glob(f"{name}*"):
                f.unlink()
        for f in ("predict.json", "summary.png"):
            (out / f).unlink(missing_ok=True)
        code, err = self.inproc(["evaluate", str(out), str(self.data), "--config",
                                 "faces64_ffhq_34"])
        what = f"{keep} of {len(names)} images, no predict.json: "
        if code == 0:
            return self.record("evaluate_partial", "silent", what + "evaluate exited 0")
        self.record("evaluate_partial", "refused" if self.clear(code, err) else "traceback",
                    what + err)

    # symlinks
    def symlink_alias(self) -> None:
        """Two writers into one run dir (odd faults) or store (even), one of them through a
        symlink to it: the lock must see one folder."""
        self.tries["symlink_alias"] += 1
        fit = self.tries["symlink_alias"] % 2 == 1
        target = self.fresh("alias_run" if fit else "alias.zarr")
        target.mkdir()
        link = self.fresh("alias_link")
        link.symlink_to(target, target_is_directory=True)
        if fit:
            self.seed_baselines(store=False, run=100 not in self.base_run)
            self._pair("symlink_alias", [self.fit_args(self.store, target, 0),
                                         self.fit_args(self.store, link, 100)],
                       [0, 100], self.run_digest, self.base_run, target)
        else:
            self.seed_baselines(store=1 not in self.base_store, run=False)
            self._pair("symlink_alias", [self.extract_args(target, 0),
                                         self.extract_args(link, 1)],
                       [0, 1], self.store_digest, self.base_store, target)

    # photos and masks
    @staticmethod
    def labels_digest(path) -> str:
        """sha256 over the maps and labels of a store (not its metadata, which names the
        image files and their bytes)."""
        store = FeatureStore.open(path)
        h = hashlib.sha256(str(store.info.has_labels).encode())
        for i in range(len(store)):
            for m in store.maps(i):
                h.update(m.tobytes())
            if store.info.has_labels:
                h.update(store.labels(i).tobytes())
        return h.hexdigest()

    ORIENTATIONS = (6, 8, 3)  # (1, upright, is the harness's own control)

    def exif_photo(self) -> None:
        """A JPEG stored sideways with an EXIF Orientation (6, then 8, then 3) and a mask of
        the upright picture, against the same picture turned upright by Pillow and saved as a
        PNG: extract and predict (from the image folder) must give the same maps, labels and
        label map for both."""
        from PIL import Image, ImageOps

        self.tries["exif_photo"] += 1
        orientation = self.ORIENTATIONS[(self.tries["exif_photo"] - 1) % len(self.ORIENTATIONS)]
        turns = {1: 0, 6: 1, 8: -1, 3: 2}[orientation]  # upright -> stored (np.rot90 turns left)
        src = self.rng.choice(sorted(self.data.glob("*.png")))
        photo, upright = self.fresh("exif"), self.fresh("upright")
        for d in (photo, upright):
            d.mkdir()
            shutil.copy(src.with_suffix(".npy"), d / "photo.npy")
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored = np.rot90(np.asarray(Image.open(src).convert("RGB")), turns)
        Image.fromarray(np.ascontiguousarray(stored)).save(photo / "photo.jpg", quality=95,
                                                           exif=exif.tobytes())
        ImageOps.exif_transpose(Image.open(photo / "photo.jpg")).save(upright / "photo.png")
        what = f"Orientation={orientation}: "
        results = {}
        for d in (upright, photo):
            code, err = self.inproc(self.extract_args(d.with_suffix(".zarr"), data=d))
            if code != 0:
                return self.settle("exif_photo", code, err, None,
                                   what + f"extract {d.name}: ")
            code, err = self.inproc(self.predict_args(d.with_suffix(".pred"), source=d))
            if code != 0:
                return self.settle("exif_photo", code, err, None,
                                   what + f"predict {d.name}: ")
            results[d] = (self.labels_digest(d.with_suffix(".zarr")),
                          np.load(d.with_suffix(".pred") / "photo.npy"))
        (s_up, p_up), (s_ph, p_ph) = results[upright], results[photo]
        if s_up != s_ph:
            return self.record("exif_photo", "silent", what + "extract exited 0, the store "
                               "differs from the upright picture's")
        if not np.array_equal(p_up, p_ph):
            return self.record("exif_photo", "silent", what + "predict exited 0, the label map "
                               "differs from the upright picture's")
        self.record("exif_photo", "identical")

    # ("standard", <id>.npy masks, is the harness's own control.)
    MASK_CASES = ("label_png", "mask_jpg", "stray_mask", "all_ignore")

    def masks_named(self) -> None:
        """Masks under other names, one case per fault in turn: ``<id>_label.png``,
        ``<id>_mask.jpg``, a mask with no image, an all-ignore mask."""
        from PIL import Image

        self.tries["masks_named"] += 1
        case = self.MASK_CASES[(self.tries["masks_named"] - 1) % len(self.MASK_CASES)]
        data = self.fresh(f"masks_{case}")
        data.mkdir()
        images = sorted(self.data.glob("*.png"))
        masks = {im.stem: np.load(im.with_suffix(".npy")) for im in images}
        for im in images:
            shutil.copy(im, data / im.name)
        odd = []  # the files a user means as masks, which the standard names do not cover
        for stem, m in masks.items():
            if case == "label_png":
                odd.append(f"{stem}_label.png")
                Image.fromarray(m).save(data / odd[-1])
            elif case == "mask_jpg":
                odd.append(f"{stem}_mask.jpg")
                Image.fromarray(m).save(data / odd[-1], quality=100)
            else:
                np.save(data / f"{stem}.npy", m)
        if case == "stray_mask":
            odd.append("ghost_mask.png")
            Image.fromarray(next(iter(masks.values()))).save(data / odd[-1])
        elif case == "all_ignore":
            stem = images[-1].stem
            np.save(data / f"{stem}.npy", np.full_like(masks[stem], 255))
            odd.append(stem)
        store = data.with_suffix(".zarr")
        code, err = self.inproc(self.extract_args(store, data=data))
        what = f"{case}: "
        if code != 0:
            return self.settle("masks_named", code, err, None, what)
        noted = all(any(name in ln and "mask" in ln.lower() for ln in err.splitlines())
                    for name in odd)
        if case not in ("stray_mask", "all_ignore") and \
                self.labels_digest(store) == self.labels_digest(self.store):
            return self.record("masks_named", "identical", what + err)
        if noted:
            return self.record("masks_named", "refused", what + err)
        self.record("masks_named", "silent", what + f"exit 0, no note naming {odd} as a mask; "
                    f"stderr: {err.strip()[-500:]}")


    # a real dask scheduler on 127.0.0.1
    def _dask(self) -> str | None:
        """The address of a `dask scheduler` with one `dask worker` (2 threads, so that a new
        attempt's task can run beside an orphaned one), started once; None where it cannot
        start (recorded as skipped)."""
        if self.dask_procs:
            return self.dask_address
        folder = self.work / "dask"
        folder.mkdir(exist_ok=True)
        info = folder / "scheduler.json"
        log = (folder / "dask.log").open("w")

        def start(*args):
            self.dask_procs.append(subprocess.Popen(
                [sys.executable, "-m", "dask", *args], cwd=folder, env=self.env,
                stdout=log, stderr=log, start_new_session=True))

        start("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--scheduler-file", str(info))
        deadline = time.monotonic() + 120
        while not info.is_file() and time.monotonic() < deadline:
            if self.dask_procs[0].poll() is not None:
                break
            time.sleep(0.2)
        if not info.is_file():
            self.close()
            self.skipped["tcp_orphan"] = unavailable(
                "tcp_orphan", f"no dask scheduler started (see {folder / 'dask.log'})")
            return None
        time.sleep(0.5)  # the file is written, then completed
        self.dask_address = json.loads(info.read_text())["address"]
        start("worker", self.dask_address, "--nthreads", "2", "--nworkers", "1", "--no-nanny",
              "--no-dashboard", "--memory-limit", "0")
        from distributed import Client
        try:
            with Client(self.dask_address, timeout=60) as client:
                client.wait_for_workers(1, timeout=120)
        except (OSError, TimeoutError) as exc:
            self.close()
            self.skipped["tcp_orphan"] = unavailable(
                "tcp_orphan", f"no dask worker joined ({exc}; see {folder / 'dask.log'})")
            return None
        return self.dask_address

    def _dask_idle(self, timeout: float = 300) -> bool:
        """Wait until no task runs on the worker (an orphaned one included)."""
        from distributed import Client

        def busy(dask_worker):
            return len(dask_worker.state.executing) + len(dask_worker.state.long_running)

        with Client(self.dask_address, timeout=60) as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not any(client.run(busy).values()):
                    return True
                time.sleep(0.2)
        return False

    def close(self) -> None:
        for p in reversed(self.dask_procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.dask_procs = []

    def tcp_orphan(self) -> None:
        """extract of 8 images (seed 0, ``--images-per-batch 8``: one long task) through a dask
        scheduler on 127.0.0.1, its client SIGKILLed 0-3 s after the store appears (its task
        goes on on the worker); at once ``extract --seed 1 --overwrite`` (the config's batch
        size: image by image) through the same scheduler (odd faults) or in one process
        (even). Once the worker is idle, the store must equal a clean seed-1 extraction, or
        the rerun must have been refused."""
        address = self._dask()
        if address is None:
            return
        self.tcp_baseline()
        self.tries["tcp_orphan"] += 1
        store = self.fresh("tcp.zarr")
        p = self.spawn(self.tcp_args(store, 0, "--images-per-batch", "8", "--scheduler", address))
        while p.poll() is None and not store.is_dir():
            time.sleep(0.01)
        try:  # the task is sent from about now, and runs for a few seconds
            p.wait(timeout=self.rng.uniform(0, 3))
        except subprocess.TimeoutExpired:
            p.kill()
        p.communicate()
        written = self._written(store)
        via = ["--scheduler", address] if self.tries["tcp_orphan"] % 2 else []
        code, err = self.inproc(self.tcp_args(store, 1, "--overwrite", *via))
        if not self._dask_idle():
            return self.record("tcp_orphan", "traceback", "the worker stayed busy for 300 s")
        what = (f"client {'killed' if p.returncode == -signal.SIGKILL else 'done'} with "
                f"{'some' if written else 'no'} image written; rerun "
                f"{'through the scheduler' if via else 'in one process'}: ")
        if code != 0:
            return self.settle("tcp_orphan", code, err, None, what)
        got = self.digest_or_none(self.store_digest, store)
        self.record("tcp_orphan", "identical" if got == self.tcp_base else "silent",
                    what + ("exit 0, store incomplete" if got is None else
                            "exit 0, the store differs from a clean seed-1 one") + f"; {err}")

    def tcp_baseline(self) -> None:
        """The 8 bundled training faces, and a clean seed-1 extraction of them (one process)."""
        if self.tcp_base is not None:
            return
        self.tcp_data = self.work / "data8"
        self.tcp_data.mkdir()
        for img in sorted(DEMO_DATA.joinpath("train").glob("*.png")):
            shutil.copy(img, self.tcp_data / img.name)
            shutil.copy(img.with_suffix(".npy"), self.tcp_data / img.with_suffix(".npy").name)
        code, err = self.inproc(self.tcp_args(self.work / "base8_seed1.zarr", 1))
        assert code == 0, err
        self.tcp_base = self.store_digest(self.work / "base8_seed1.zarr")

    @classmethod
    def _written(cls, store: Path) -> bool:
        """Whether an activation or label chunk of ``store`` is on disk yet."""
        try:
            return bool(cls._chunks(store, False))
        except OSError:  # a temporary file went while we looked
            return False

    def tcp_args(self, store, seed, *extra):
        return self.extract_args(store, seed, *extra, data=self.tcp_data)

def run(counts: dict, work: Path, images: int = 3, seed: int = 0) -> dict:
    h = Harness(work, images, seed)
    t0 = time.perf_counter()
    h.baselines()
    h.seed_baselines(bool(counts.get("extract_pair")), bool(counts.get("fit_pair")))
    spent = {}
    try:
        for kind, n in counts.items():
            t = time.perf_counter()
            for _ in range(n):
                getattr(h, kind)()
                if kind in h.skipped:
                    break
            spent[kind] = round(time.perf_counter() - t, 1)
    finally:
        h.close()
    table = {k: {o: int(h.counts.get(k, Counter())[o]) for o in OUTCOMES} for k in counts}
    for k in table:
        table[k]["injected"] = sum(table[k][o] for o in OUTCOMES)
    return {"table": table, "skipped": h.skipped, "examples": h.examples,
            "seconds": time.perf_counter() - t0, "seconds_per_kind": spent,
            "baseline_seconds": {"extract": h.t_extract, "fit": h.t_fit},
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "threads": 1, "images": images, "seed": seed}


def format_table(result: dict) -> str:
    lines = ["| fault | injected | recovered identically | refused with a clear error | "
             "silently wrong | traceback | data lost |", "|---|---:|---:|---:|---:|---:|---:|"]
    total = Counter()
    for kind, row in result["table"].items():
        lines.append(f"| {kind} | {row['injected']} | {row['identical']} | {row['refused']} | "
                     f"{row['silent']} | {row['traceback']} | {row['lost']} |")
        total.update(row)
    lines.append(f"| **all** | {total['injected']} | {total['identical']} | "
                 f"{total['refused']} | {total['silent']} | {total['traceback']} | "
                 f"{total['lost']} |")
    for kind, why in result["skipped"].items():
        lines.append(f"\n{kind} skipped: {why}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few faults of each kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--work", default=None, help="working folder [default: a temporary one]")
    ap.add_argument("--only", default=None, metavar="KIND[,KIND]",
                    help=f"run only these fault kinds ({', '.join(FULL)})")
    ap.add_argument("--out", default=None, help="the JSON results [default: "
                    "bench/results/faults.json; none with --only]")
    a = ap.parse_args()
    counts = QUICK if a.quick else FULL
    if a.only:
        kinds = [k.strip() for k in a.only.split(",") if k.strip()]
        unknown = [k for k in kinds if k not in FULL]
        if unknown:
            ap.error(f"unknown fault kind(s) {', '.join(unknown)}; the kinds: {', '.join(FULL)}")
        # At least one of each kind asked for, even where --quick runs none.
        counts = {k: max(1, counts[k]) for k in kinds}
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="ddpmseg-faults-"))
    try:
        result = run(counts, work, a.images, a.seed)
    except Unavailable as exc:
        sys.exit(f"error: {exc}")
    print(format_table(result))
    print(f"\n{result['seconds']:.0f} s; baselines: extract "
          f"{result['baseline_seconds']['extract']:.1f} s, "
          f"fit {result['baseline_seconds']['fit']:.1f} s (one process each, incl. start-up); "
          f"1 thread; {result['machine']}")
    out = a.out or (None if a.only else ROOT / "bench/results/faults.json")
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
