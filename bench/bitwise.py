"""Bit-for-bit fingerprint of what the pipeline writes, to compare two versions of ddpmseg.

Runs the demo (extract, fit, predict, evaluate, report on the bundled data and backbone) and,
when ../shared/fixtures/reference_run is there, imports the reference run and predicts its test
images; then prints and writes the sha256 of every file those wrote. Files that hold a time or a
path (logs, JSON records) are listed with their size only; everything that is data (zarr chunks,
members, label maps, probabilities, pictures) is hashed.

    python bench/bitwise.py OUT_DIR            # writes OUT_DIR/bitwise.json
    python bench/bitwise.py --compare A.json B.json

Threads: one torch thread (the same sums in the same order on every run).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "reference_run"
# Files whose bytes carry a time, a duration, a path or a version: compared by presence only.
VOLATILE = (".log", ".json", ".jsonl", ".html", ".lock", ".txt")


def run(*args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(["ddpmseg", "--no-progress", *args], check=True, env=env)


def digest(path: Path) -> str:
    if path.name == "zarr.json":
        meta = json.loads(path.read_text())
        for key in ("writer", "ddpmseg_digest"):
            meta.get("attributes", {}).pop(key, None)
        return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    if path.suffix == ".pt" and path.name.startswith("member_"):
        import torch

        member = torch.load(path, map_location="cpu", weights_only=False)
        member["meta"].pop("seconds", None)
        h = hashlib.sha256(json.dumps(member["meta"], sort_keys=True).encode())
        for name, tensor in member["state_dict"].items():
            h.update(name.encode())
            h.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        if "/writer/" in rel and ".zarr/" in rel:
            continue  # the random token of the extract that wrote each image
        if path.name.endswith(VOLATILE) and path.name != "zarr.json":
            out[rel] = "present"
            continue
        out[rel] = digest(path)
    return out


def produce(out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    run("demo", "--out", str(out / "demo"))
    if REFERENCE.is_dir():
        run("import-run", str(REFERENCE / "pixel_classifiers"), str(out / "ref_run"),
            "--config", str(REFERENCE / "ddpm.json"))
        run("predict", str(out / "ref_run"), str(REFERENCE / "data" / "test"),
            str(out / "ref_pred"))
    return fingerprint(out)


def compare(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k, 'absent')[:12]} != {b.get(k, 'absent')[:12]}"
            for k in keys if a.get(k) != b.get(k)]


def main() -> None:
    if sys.argv[1] == "--rehash":  # recompute an earlier run's fingerprint under today's rules
        out = Path(sys.argv[2])
        record = json.loads((out / "bitwise.json").read_text())
        record["files"] = fingerprint(out)
        (out / "bitwise.json").write_text(json.dumps(record, indent=1))
        return
    if sys.argv[1] == "--compare":
        a, b = (json.loads(Path(p).read_text())["files"] for p in sys.argv[2:4])
        diffs = compare(a, b)
        hashed = sum(1 for v in a.values() if v != "present")
        print(f"{len(a)} files ({hashed} hashed) vs {len(b)}: {len(diffs)} differ")
        print("\n".join(diffs))
        sys.exit(1 if diffs else 0)
    out = Path(sys.argv[1])
    files = produce(out)
    record = {"files": files, "machine": platform.processor() or platform.machine(),
              "threads": os.environ.get("OMP_NUM_THREADS", "1")}
    (out / "bitwise.json").write_text(json.dumps(record, indent=1))
    print(f"{len(files)} files, {sum(v != 'present' for v in files.values())} hashed -> "
          f"{out / 'bitwise.json'}")


if __name__ == "__main__":
    main()
