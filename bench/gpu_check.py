"""GPU check: CUDA against CPU features, and extraction / fit / predict on the GPU, in one run.

One command (under 5 minutes on one GPU), one table on stdout, one JSON file:

1. parity: activations on the device against the CPU's (float32), for the two ADM fixtures of
   ../shared/fixtures/adm (when present) and the bundled faces64 backbone: max |difference|,
   pass when within 1e-4 (abs + rel); the same under bf16 and fp16 autocast, reported (their
   worst relative L2 error over the (step, block) maps) but not judged.
2. extraction: images/s of ``extract`` (the store writer's threads running beside the model) on
   the LSUN-256 architecture (random weights), and the share of that time the GPU was busy
   (NVML utilisation sampled every 0.1 s: ``torch.cuda.utilization``, else ``nvidia-smi``).
3. fit: labelled pixels/s of one member, one epoch, streaming from the store against
   ``in_memory``, on the device.
4. predict: peak GPU memory allocated while ``predict_maps`` labels one 256 px image, for 1 and
   10 members.

``--cpu`` runs every part on the CPU at CI size (part 1 on the 64 px fixture and faces64, one
step, one image; a 32 px toy architecture for 2-4): that form is what the test suite runs. The
device then is the CPU, so part 1 compares it with independent results instead of itself: the
fixture's activations recorded from the original guided-diffusion code, and for faces64 a
float64 run of the same weights. The exit code is 1 when any float32 comparison fails.

    python bench/gpu_check.py            # on a CUDA machine
    python bench/gpu_check.py --cpu      # no GPU: path check, a few seconds

Writes bench/results/gpu_check.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from ddpmseg.backbone import Backbone  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "adm"
FACES = Path(__file__).resolve().parents[1] / "ddpmseg" / "assets" / "demo" / "train"
# A toy architecture for --cpu: 32 px, two levels, attention at 16 px.
TOY_FLAGS = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
             "attention_resolutions": "16", "num_head_channels": 16, "learn_sigma": True,
             "use_scale_shift_norm": True, "resblock_updown": True, "diffusion_steps": 1000}
TOL = 1e-4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- 1. parity --------------------------------------------------------------------------------
def parity_cases(cpu_mode: bool) -> list[tuple[str, Backbone, torch.Tensor, list, list, dict]]:
    """(name, CPU backbone, x0, steps, blocks, fixture) for each model the check compares;
    fixture is the reference npz's arrays (None for faces64)."""
    from ddpmseg.data import load_image

    cases = []
    # CI size: the 64 px fixture only (the 256 px one takes most of a minute on a busy CPU).
    for name in (("adm_tiny64_cosine",) if cpu_mode else ("adm_tiny256", "adm_tiny64_cosine")):
        meta_path = FIXTURES / f"{name}.json"
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        with np.load(FIXTURES / f"{name}_reference.npz") as npz:
            fixture = {k: torch.from_numpy(npz[k]) for k in npz.files}
        bb = Backbone.from_checkpoint(FIXTURES / f"{name}.pt", meta["model_flags"], device="cpu")
        cases.append((name, bb, fixture["x0"], list(meta["steps"]), list(meta["blocks"]),
                      fixture))
    bb = Backbone.from_checkpoint("bundled:faces_64", "faces_64", device="cpu")
    size = (bb.flags.image_size,) * 2
    paths = sorted(FACES.glob("*.png"))[:1 if cpu_mode else 4]
    x0 = torch.stack([torch.from_numpy(load_image(p, size, resize=True)).permute(2, 0, 1)
                      for p in paths]).float() / 127.5 - 1
    cases.append(("faces_64", bb, x0, [50, 150, 250], [2, 4, 5, 7, 8], None))
    return cases


def float64_activations(bb: Backbone, x0: torch.Tensor, noise: torch.Tensor, steps: list,
                        blocks: list) -> dict:
    """{(t, b): float64 maps} of a float64 copy of bb's CPU model, noised and run step by step
    without ``Backbone.activations``. GroupNorm keeps float32 weights: the model normalises
    in float32 by definition (nn.GroupNorm32); every other layer casts its inputs up."""
    import copy

    def up(_module, args):
        return tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a
                     for a in args)

    model = copy.deepcopy(bb.model).to("cpu").double()
    for m in model.modules():
        m.register_forward_pre_hook(up)
        if isinstance(m, torch.nn.GroupNorm):
            m.float()
    out = {}
    with torch.inference_mode():
        for s in steps:
            t = torch.full((x0.shape[0],), s, dtype=torch.long)
            x_t = bb.schedule.q_sample(x0.double(), t, noise.double())
            feats = model.decoder_features(x_t, bb.schedule.model_timesteps(t), blocks)
            out.update({(s, b): feats[b] for b in blocks})
    return out


def reference(bb_cpu: Backbone, x0, noise, steps, blocks, fixture, cpu_mode: bool):
    """(label, {(t, b): maps}) the device's activations are judged against: on a GPU the
    CPU's float32; with --cpu (the device is the CPU) something independent of it."""
    if not cpu_mode:
        return "cpu", bb_cpu.activations(x0, steps, blocks, noise=noise)
    if fixture is not None:
        return "guided-diffusion", {(t, b): fixture[f"act_t{t}_b{b}"]
                                    for t in steps for b in blocks}
    return "float64", float64_activations(bb_cpu, x0, noise, steps, blocks)


def parity(device: torch.device, cpu_mode: bool) -> list[dict]:
    rows = []
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    for name, bb_cpu, x0, steps, blocks, fixture in parity_cases(cpu_mode):
        steps = steps[:1] if cpu_mode else steps   # CI size: one step
        noise = fixture["noise"] if fixture is not None else \
            bb_cpu.default_noise(x0.shape[2], x0.shape[3], 0)
        label, ref = reference(bb_cpu, x0, noise, steps, blocks, fixture, cpu_mode)
        bb = Backbone(bb_cpu.model, bb_cpu.flags, bb_cpu.sha256, device=device) \
            if device.type != "cpu" else bb_cpu
        row = {"model": name, "reference": label, "images": x0.shape[0], "steps": steps,
               "blocks": blocks}
        for prec in precisions:
            acts = bb.activations(x0, steps, blocks, noise=noise, precision=prec)
            worst_abs = worst_rel_l2 = 0.0
            ok = True
            for key, r in ref.items():
                a = acts[key].double().cpu()
                r = r.double()
                d = (a - r).abs()
                worst_abs = max(worst_abs, float(d.max()))
                worst_rel_l2 = max(worst_rel_l2, float((a - r).norm() / r.norm().clamp_min(1e-12)))
                ok = ok and bool((d <= TOL + TOL * r.abs()).all())
            row[prec] = {"max_abs_diff": worst_abs, "max_rel_l2": worst_rel_l2,
                         "within_1e-4": ok if prec == "fp32" else None}
        if device.type != "cpu":
            bb_cpu.model.to("cpu")   # the Backbone above moved the shared module
        rows.append(row)
    return rows


# -- 2. extraction ------------------------------------------------------------------------------
class BusySampler:
    """Samples the GPU's utilisation every ``period`` s in a thread while in its block."""

    def __init__(self, device: torch.device, period: float = 0.1):
        self.device, self.period, self.samples = device, period, []
        self.source = None
        self._stop = threading.Event()
        if device.type != "cuda":
            return
        try:
            torch.cuda.utilization(device)
            self.source = "torch.cuda.utilization (NVML)"
        except Exception:  # noqa: BLE001 - pynvml missing or NVML unavailable
            if shutil.which("nvidia-smi"):
                self.source = "nvidia-smi"

    def _read(self) -> float:
        if self.source and self.source.startswith("torch"):
            return float(torch.cuda.utilization(self.device))
        index = self.device.index if self.device.index is not None else 0
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu",
                              "--format=csv,noheader,nounits", "-i", str(index)],
                             capture_output=True, text=True, timeout=5)
        return float(out.stdout.strip().splitlines()[0])

    def _loop(self):
        while not self._stop.wait(self.period):
            self.samples.append(self._read())

    def __enter__(self):
        if self.source:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.source:
            self._thread.join()

    @property
    def busy(self) -> float | None:
        return float(np.mean(self.samples)) / 100 if self.samples else None


def make_images(folder: Path, n: int, size: int, num_classes: int, labelled: int) -> None:
    """n random images with masks: a ``labelled`` x ``labelled`` square of random classes in
    the top-left corner, the rest the ignore label 255 (few pixels: a quick fit)."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / f"img{i:03d}.png")
        mask = np.full((size, size), 255, dtype=np.uint8)
        # Large blocks of one class, so that no class falls under the 20-pixel rule.
        cells = rng.integers(0, num_classes, (labelled // 8, labelled // 8)).astype(np.uint8)
        mask[:labelled, :labelled] = np.kron(cells, np.ones((8, 8), dtype=np.uint8))
        np.save(folder / f"img{i:03d}.npy", mask)


def extraction(device, cfg, bb, data: Path, store_path: Path, warm: torch.Tensor) -> dict:
    from ddpmseg.pipelines.extract import extract

    fc = cfg.features
    bb.activations(warm.to(device), fc.steps, fc.blocks)   # kernel selection, not measured
    _sync(device)
    model_s = [0.0]
    inner = bb.activations

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        _sync(device)
        model_s[0] += time.perf_counter() - t0
        return out

    bb.activations = timed
    try:
        with BusySampler(device) as sampler:
            t0 = time.perf_counter()
            store = extract(data, store_path, cfg, backbone=bb, device=device, progress=False)
            wall = time.perf_counter() - t0
    finally:
        del bb.activations
    n = len(store)
    return {"images": n, "seconds": wall, "images_per_s": n / wall,
            "model_share": model_s[0] / wall, "gpu_busy": sampler.busy,
            "busy_source": sampler.source, "busy_samples": len(sampler.samples),
            "feature_dim": store.info.feature_dim}


# -- 3. fit ---------------------------------------------------------------------------------------
def fit_speed(device, cfg, store_path: Path, work: Path) -> dict:
    from ddpmseg.classifier import fit
    from ddpmseg.featcache import FeatureStore

    store = FeatureStore.open(store_path)
    ignore = store.info.ignore_label
    pixels = sum(int((store.labels(i) != ignore).sum()) for i in range(len(store)))
    c = cfg.replace(classifier={"ensemble": 1, "max_epochs": 1, "min_epochs": 1})
    out = {"labelled_pixels": pixels}
    for mode in ("streaming", "in_memory"):
        t0 = time.perf_counter()
        fit(store, work / f"run_{mode}", c, device=device, in_memory=mode == "in_memory",
            resume=False, progress=False)
        _sync(device)
        out[f"{mode}_pixels_per_s"] = pixels / (time.perf_counter() - t0)
    out["streaming_over_in_memory"] = out["streaming_pixels_per_s"] / out["in_memory_pixels_per_s"]
    return out


# -- 4. predict -----------------------------------------------------------------------------------
def predict_memory(device, store_path: Path, run: Path) -> dict:
    from ddpmseg.classifier import load_ensemble
    from ddpmseg.featcache import FeatureStore
    from ddpmseg.pipelines.predict import predict_maps

    store = FeatureStore.open(store_path)
    members = load_ensemble(run, device=device).members
    maps = store.maps(0)
    out = {"image_size": list(store.info.image_size)}
    for k in (1, 10):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            predict_maps(members * k, maps, tuple(store.info.image_size), device=device)
        _sync(device)
        out[f"k{k}_seconds"] = time.perf_counter() - t0
        out[f"k{k}_peak_gpu_bytes"] = (torch.cuda.max_memory_allocated(device) - base
                                       if device.type == "cuda" else None)
    return out


# -- the run --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true",
                    help="run on the CPU at CI size (no GPU needed: a path check)")
    ap.add_argument("--device", default="cuda", help="the GPU (default cuda)")
    ap.add_argument("--images", type=int, default=None,
                    help="images extracted (default 24 on a GPU, 2 with --cpu)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"
                                         / "gpu_check.json"))
    args = ap.parse_args(argv)
    from ddpmseg import load_config
    from ddpmseg.core.device import resolve_device

    if args.cpu:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device; run with --cpu for the CPU path check")
        device = resolve_device(args.device)
    t_all = time.perf_counter()
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.machine()}, {os.cpu_count()} CPUs (--cpu: CI size)")
    result = {"benchmark": "gpu_check", "device": str(device), "machine": machine,
              "torch": torch.__version__, "threads": torch.get_num_threads()}

    t0 = time.perf_counter()
    result["parity"] = parity(device, args.cpu)
    result["parity_s"] = time.perf_counter() - t0

    preset = TOY_FLAGS if args.cpu else "lsun_256"
    steps, blocks = ((50, 150), (1, 2)) if args.cpu else ((50, 150, 250), (5, 6, 7, 8, 12))
    n = args.images or (2 if args.cpu else 24)
    bb = Backbone.random(preset, seed=0, device=device)
    size = bb.flags.image_size
    cfg = load_config("bedroom_28").replace(
        model={"preset": "lsun_256"},
        data={"ignore_label": 255, "num_classes": 4, "class_names": ()},
        features={"steps": steps, "blocks": blocks})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "data", n, size, 4, labelled=16 if args.cpu else 64)
        warm = torch.rand(1, 3, size, size) * 2 - 1
        result["extraction"] = extraction(device, cfg, bb, tmp / "data", tmp / "store.zarr", warm)
        result["extraction"]["architecture"] = "toy 32px" if args.cpu else "lsun_256 (random)"
        del bb
        t0 = time.perf_counter()
        result["fit"] = fit_speed(device, cfg, tmp / "store.zarr", tmp)
        result["fit_s"] = time.perf_counter() - t0
        result["predict"] = predict_memory(device, tmp / "store.zarr", tmp / "run_streaming")
    result["total_s"] = time.perf_counter() - t_all

    print(render(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    failed = [p["model"] for p in result["parity"] if not p["fp32"]["within_1e-4"]]
    if failed:
        print(f"error: float32 activations of {', '.join(failed)} differ from their reference "
              f"by more than {TOL} (see the table)", file=sys.stderr)
        return 1
    return 0


def render(r: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.0f}%"

    lines = [f"gpu_check on {r['device']} ({r['machine']}), torch {r['torch']}, "
             f"{r['total_s']:.0f} s", "", "| check | figure | baseline / bound |", "|---|---|---|"]
    for p in r["parity"]:
        f32 = p["fp32"]
        lines.append(f"| activations {p['model']}, {r['device']} vs {p['reference']}, fp32 | "
                     f"max abs diff "
                     f"{f32['max_abs_diff']:.3g} ({'pass' if f32['within_1e-4'] else 'FAIL'}) | "
                     f"<= 1e-4 abs + rel |")
        for prec in ("bf16", "fp16"):
            if prec in p:
                lines.append(f"| activations {p['model']}, {prec} autocast | rel. L2 "
                             f"{p[prec]['max_rel_l2']:.3g} (max abs {p[prec]['max_abs_diff']:.3g})"
                             f" | reported |")
    e = r["extraction"]
    lines.append(f"| extract {e['architecture']}, {e['feature_dim']} dims, writer in parallel | "
                 f"{e['images_per_s']:.2f} images/s; GPU busy {pct(e['gpu_busy'])} | "
                 f"model share of wall time {pct(e['model_share'])} |")
    f = r["fit"]
    lines.append(f"| fit, 1 member, 1 epoch, {f['labelled_pixels']} px | streaming "
                 f"{f['streaming_pixels_per_s']:.0f} px/s | in memory "
                 f"{f['in_memory_pixels_per_s']:.0f} px/s ({f['streaming_over_in_memory']:.2f}x) |")
    p = r["predict"]
    for k in (1, 10):
        peak = p[f"k{k}_peak_gpu_bytes"]
        lines.append(f"| predict one {p['image_size'][0]} px image, K={k} | peak GPU memory "
                     f"{'n/a' if peak is None else f'{peak / 2**20:.0f} MiB'} | "
                     f"{p[f'k{k}_seconds']:.2f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
