"""Training (or fine-tuning) an ADM backbone on a folder of images, as guided-diffusion does.

The objective is DDPM's: epsilon MSE at uniformly drawn steps, plus, when the model learns its
variance (``learn_sigma``), the variational-bound term on the variance channels with a
stop-gradient on the mean (guided-diffusion's hybrid loss). AdamW, an EMA of the weights,
random horizontal flips; images are resized and centre-cropped to the model size once and held
in RAM as uint8.

Every random draw of training -- epoch permutations, flips, steps, noise -- comes from one
``torch.Generator`` owned by the run. Dropout (and the default initialisation of the modules)
can only draw from torch's global generators: the run owns their state too (``Streams``), swaps
it in for each step and out again, so the caller's random streams are never touched. Both are
saved with the optimizer, so ``resume=True`` continues bit for bit (on CPU) as if the run had
never stopped.

Data parallel (DDP): launched by ``torchrun`` (WORLD_SIZE > 1 in the environment),
``train_backbone`` joins the process group (nccl on ``cuda:LOCAL_RANK``, gloo on the CPU) and
wraps the model in DistributedDataParallel. ``batch_size`` stays the *global* batch: every rank
makes the same draws from the run's generator (so data order, flips, steps and noise are those
of a single-process run) and trains on its own contiguous slice of ``batch_size / WORLD_SIZE``
images; DDP averages the gradients, so a step equals a single-process step on the whole batch
(up to float rounding and dropout). Dropout draws from ``seed + rank``. Only rank 0 writes
checkpoints, logs and samples and shows progress; every rank loads the state on resume. E.g.::

    torchrun --nproc_per_node 4 $(which ddpmseg) train-backbone IMAGES OUT --preset faces_64 ...

Output folder::

    ema.pt          EMA weights (guided-diffusion key names; Backbone.from_checkpoint loads it)
    model.pt        raw weights
    state.pt        optimizer, step, RNG states, data order position
    flags.json      the model flags
    train_log.jsonl one line of loss and speed per log interval
    samples.png     a grid sampled from the EMA weights at each save (unless samples=0)
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch.nn.parallel import DistributedDataParallel

from ddpmseg.core.device import resolve_device, use_threads
from ddpmseg.core.errors import ConfigError, RunError
from ddpmseg.core.locking import writer_lock
from ddpmseg.core.progress import bar
from ddpmseg.core.renames import renamed_keyword
from ddpmseg.backbone.diffusion import Schedule
from ddpmseg.backbone.adm.flags import ModelFlags
from ddpmseg.backbone.sampling import image_grid, sample
from ddpmseg.backbone.adm.unet import UNetModel, zero_init_
from ddpmseg.backbone.train import ddp, files
from ddpmseg.backbone.train.data import DataOrder, load_images
from ddpmseg.backbone.train.losses import training_losses

log = logging.getLogger(__name__)


class Streams:
    """The state of torch's global CPU generator (and of the training device's CUDA one), which
    dropout and the modules' default initialisation draw from, held by the run: ``active()``
    swaps it in for a ``with`` block and the caller's state back after."""

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        self._cuda = device.type == "cuda"
        self.cpu = self.cuda = None
        with self.active():
            self.seed(seed)

    def seed(self, seed: int) -> None:
        """Inside ``active()``: as ``torch.manual_seed(seed)`` for the run's generators."""
        torch.default_generator.manual_seed(int(seed))
        if self._cuda:
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(int(seed))

    @contextlib.contextmanager
    def active(self):
        devices = [self.device] if self._cuda else []
        with torch.random.fork_rng(devices=devices):
            if self.cpu is not None:
                torch.set_rng_state(self.cpu)
                if self._cuda:
                    torch.cuda.set_rng_state(self.cuda, self.device)
            try:
                yield
            finally:
                self.cpu = torch.get_rng_state()
                if self._cuda:
                    self.cuda = torch.cuda.get_rng_state(self.device)


class Trainer:
    """One training run: model, EMA, optimizer, data and RNG, saved to and resumed from ``out``.

    ``train_backbone`` is the usual entry; the class is there for tests and benchmarks that
    step it by hand.
    """

    def __init__(self, images: torch.Tensor, flags: ModelFlags, out_dir: Path | None, *,
                 batch_size: int = 16, lr: float = 1e-4, ema: float = 0.9999,
                 weight_decay: float = 0.0, device: str | torch.device = "auto", seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        """``rank`` / ``world_size`` > 1: one DDP process of a joined process group (see
        ``train_backbone``); ``batch_size`` is the global batch, divisible by ``world_size``."""
        if world_size > 1 and batch_size % world_size:
            raise ConfigError(f"the batch size {batch_size} does not split evenly over "
                              f"{world_size} processes",
                              f"use a multiple of {world_size} (the batch is the global one)")
        self.rank = rank
        self.world_size = world_size
        self.flags = flags
        self.out = out_dir
        self.device = resolve_device(device)
        self.images = images
        self.batch_size = batch_size
        self.ema_rate = ema
        self.lr = lr
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)
        self.streams = Streams(seed, self.device)
        with self.streams.active():
            self._build_models(flags)
        # Fused AdamW (CPU and CUDA): one kernel over all parameters, ~3x faster than the
        # default per-tensor loop on CPU; deterministic, so resume stays exact.
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, fused=True)
        self.schedule = Schedule.from_flags(flags)
        self.order = DataOrder(len(images), self.gen)
        self.step = 0

    def _build_models(self, flags: ModelFlags) -> None:
        """The model (guided-diffusion's initialisation), its EMA copy and, under DDP, the
        wrapper; inside ``streams.active()`` (the default init draws from it)."""
        self.model = zero_init_(UNetModel.from_flags(flags)).to(self.device)
        self.model.train()
        self.ema_model = UNetModel.from_flags(flags).to(self.device)
        self.ema_model.load_state_dict(self.model.state_dict())
        self.ema_model.eval().requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema_params = list(self.ema_model.parameters())
        # ``net`` is what the forward pass goes through: the model, or its DDP wrapper (which
        # broadcasts rank 0's initial weights); ``model`` stays the bare module for saving.
        self.net: torch.nn.Module = self.model
        if self.world_size > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
            # Each rank its own dropout stream (the model init above used ``seed`` everywhere).
            self.streams.seed(self.seed + self.rank)

    # -- one step --

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, t, noise) of the next step; every draw from the run's generator, on the CPU."""
        b = self.batch_size
        idx = self.order.next(b)
        flip = torch.rand(b, generator=self.gen) < 0.5
        t = torch.randint(0, self.flags.diffusion_steps, (b,), generator=self.gen)
        noise = torch.randn((b, 3, self.flags.image_size, self.flags.image_size),
                            generator=self.gen)
        if self.world_size > 1:
            # All ranks drew the whole global batch alike; each keeps its own slice.
            n = b // self.world_size
            part = slice(self.rank * n, (self.rank + 1) * n)
            idx, flip, t, noise = idx[part], flip[part], t[part], noise[part]
        x = self.images[idx]
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        nb = self.device.type == "cuda"
        x0 = x.to(self.device, non_blocking=nb).float().div_(127.5).sub_(1.0)
        return x0, t.to(self.device, non_blocking=nb), noise.to(self.device, non_blocking=nb)

    def train_step(self) -> dict[str, float]:
        x0, t, noise = self.next_batch()
        with self.streams.active():  # dropout
            losses = training_losses(self.net, self.schedule, x0, t, noise,
                                     self.flags.learn_sigma)
            loss = losses["loss"].mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - self.ema_rate)
        self.step += 1
        return {k: v.detach().mean() for k, v in losses.items()}

    # -- save / load --

    def save(self, samples: int = 0, sample_steps: int = 50) -> None:
        """Write the checkpoint files (see ``files``) so that a kill at any moment leaves a
        resumable set. Under DDP every rank must call it: the ranks' RNG states are gathered,
        rank 0 writes, and all wait for it at a barrier.
        """
        rank_rng = None
        if self.world_size > 1:
            with self.streams.active():
                rank_rng = ddp.gather_rng_states(self.world_size, self.device)
            if self.rank != 0:
                ddp.barrier(self.world_size)
                return
        try:
            with self.streams.active():  # the run's global-generator states are saved
                self._write(samples, sample_steps, rank_rng)
        finally:
            ddp.barrier(self.world_size)

    def _write(self, samples: int, sample_steps: int, rank_rng: list | None) -> None:
        state = {
            "optimizer": self.opt.state_dict(),
            "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "order": self.order.state(),
            "hparams": {"batch_size": self.batch_size, "lr": self.lr, "ema": self.ema_rate,
                        "seed": self.seed, "threads": torch.get_num_threads()},
        }
        if rank_rng is not None:
            state["world_size"] = self.world_size
            state["rank_rng"] = [{"torch_rng": c, "cuda_rng": g} for c, g in rank_rng]
        files.write_checkpoint(self.out, self.step, self.model, self.ema_model,
                               self.flags.to_dict(), state)
        if samples > 0:
            gen = torch.Generator().manual_seed(self.seed)
            imgs = sample(self.ema_model, self.flags, samples, sample_steps, gen, self.device)
            files.write_samples(self.out, image_grid(imgs))

    def load(self) -> None:
        out = self.out
        state = files.read_state(out)
        if self.rank == 0:
            files.roll_forward(out, int(state["step"]))
        ddp.barrier(self.world_size)  # the others read the weights once rank 0 has rolled
        model_sd, ema_sd = files.read_weights(out)
        try:
            self.model.load_state_dict(model_sd)
            self.ema_model.load_state_dict(ema_sd)
        except RuntimeError as exc:
            raise RunError(f"the weights in {out} do not fit the model flags: {exc}",
                           "resume with the run's own flags (its flags.json)") from exc
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        with self.streams.active():
            self._load_streams(state)
        self.order.load(state["order"])
        self.step = int(state["step"])

    def _load_streams(self, state: dict) -> None:
        """The saved states of the generators dropout draws from (inside ``streams.active``)."""
        cuda = self.device.type == "cuda"
        if self.world_size == 1:
            torch.set_rng_state(state["torch_rng"])
            if cuda and state.get("cuda_rng"):
                index = self.device.index if self.device.index is not None else \
                    torch.cuda.current_device()
                torch.cuda.set_rng_state(state["cuda_rng"][index], self.device)
        elif state.get("world_size") == self.world_size and state.get("rank_rng"):
            mine = state["rank_rng"][self.rank]
            torch.set_rng_state(mine["torch_rng"])
            if cuda and mine.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
        else:
            # Saved by another number of processes: the data order still resumes exactly;
            # dropout gets a fresh stream per rank.
            self.streams.seed(self.seed + self.rank + 7919 * (int(state["step"]) + 1))


def _check_positive(name: str, value, *, allow_none: bool = False, integer: bool = False) -> None:
    if value is None and allow_none:
        return
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
    if integer and not bad and not float(value).is_integer():
        bad = True
    if bad or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{name} must be a positive {'integer' if integer else 'number'}, "
                          f"got {value!r}")


@dataclass(frozen=True)
class TrainJob:
    """How long and how to train (``train_backbone``'s settings, but the folders and flags)."""

    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 16
    lr: float = 1e-4
    ema: float = 0.9999
    resume: bool = False
    save_every: float = 10.0
    seed: int = 0
    samples: int = 4
    sample_steps: int = 50
    log_every: int = 10
    progress: bool = True

    def check(self) -> None:
        """ConfigError for a setting out of range."""
        if self.steps is None and self.minutes is None:
            raise ConfigError("give a number of iterations or of minutes to train",
                              "pass `iterations=N` or `minutes=M`")
        _check_positive("iterations", self.steps, allow_none=True, integer=True)
        _check_positive("minutes", self.minutes, allow_none=True)
        _check_positive("images_per_iteration", self.batch_size, integer=True)
        _check_positive("lr", self.lr)
        _check_positive("save_every", self.save_every)
        _check_positive("log_every", self.log_every, integer=True)
        if not (isinstance(self.ema, (int, float)) and 0.0 <= self.ema < 1.0):
            raise ConfigError(f"ema must be in [0, 1), got {self.ema!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or \
                self.samples < 0:
            raise ConfigError(f"samples must be 0 or a positive integer, got {self.samples!r}")


def train_backbone(images_dir: str | Path, out_dir: str | Path,
                   flags: ModelFlags | Mapping | str | Path | None = None, *,
                   iterations: int | None = None, minutes: float | None = None,
                   images_per_iteration: int = 16, lr: float = 1e-4, ema: float = 0.9999,
                   device: str | torch.device = "auto", resume: bool = False,
                   save_every: float = 10.0, seed: int = 0, samples: int = 4,
                   sample_passes: int = 50, log_every: int = 10, progress: bool = True,
                   threads: int | None = None, steps: int | None = None,
                   batch_size: int | None = None, sample_steps: int | None = None) -> Path:
    """Train an ADM UNet on the images of ``images_dir``; checkpoints go to ``out_dir``.

    ``flags``: ModelFlags, a preset name, a flag dict or a JSON file (None on resume: the run's
    flags.json). Stops after ``iterations`` optimiser iterations in all (counted from the run's
    start, so a resumed run stops at the same one) or after ``minutes`` of this call, whichever
    comes first; one of them is required. ``save_every``: minutes between checkpoints (also
    saved at the end). ``samples``: images in samples.png at each save (0: none), drawn in
    ``sample_passes`` strided ancestral denoising passes from the EMA weights. ``threads``:
    torch's CPU threads while it runs (``core.device.use_threads``; the caller's setting is back
    after). ``steps``, ``batch_size`` and ``sample_steps`` are the old spellings of
    ``iterations``, ``images_per_iteration`` and ``sample_passes`` (one more release, with a
    note). Returns ``out_dir``.

    Under ``torchrun`` (WORLD_SIZE > 1 in the environment) this process is one rank of a DDP
    run (see the module's doc): it joins the process group (unless the caller already has),
    ``images_per_iteration`` is the global batch (a multiple of WORLD_SIZE), and the group is
    destroyed again at the end. A ``cuda`` or ``auto`` device becomes ``cuda:LOCAL_RANK``.
    """
    renamed = functools.partial(renamed_keyword, "train_backbone")
    job = TrainJob(steps=renamed("steps", steps, "iterations", iterations), minutes=minutes,
                   batch_size=renamed("batch_size", batch_size, "images_per_iteration",
                                      images_per_iteration),
                   lr=lr, ema=ema, resume=resume, save_every=save_every, seed=seed,
                   samples=samples, log_every=log_every, progress=progress,
                   sample_steps=renamed("sample_steps", sample_steps, "sample_passes",
                                        sample_passes))
    with use_threads(threads):
        if ddp.world_size_from_env() <= 1:
            with _writing(out_dir, 0):
                return _train(images_dir, out_dir, flags, job, device, rank=0, world_size=1)
        with ddp.process_group(device) as (rank, world_size, dev), _writing(out_dir, rank):
            return _train(images_dir, out_dir, flags, job, dev, rank=rank,
                          world_size=world_size)


def _writing(out_dir, rank: int):
    """The run dir's writer lock, held by the one process that writes it (rank 0): a second
    train-backbone into the same folder is refused, naming the first."""
    if rank != 0:
        return contextlib.nullcontext()
    return writer_lock(Path(out_dir).expanduser(), "backbone run dir")


def _run_flags(out: Path, flags, resume: bool) -> tuple[ModelFlags, bool]:
    """The model flags to train with, and whether an earlier run in ``out`` is resumed."""
    has_run = (out / "state.pt").is_file()
    if resume and has_run:
        saved = ModelFlags.resolve(out / "flags.json")
        flags = saved if flags is None else ModelFlags.resolve(flags)
        if flags != saved:
            raise ConfigError(f"the flags differ from those of the run in {out}",
                              "resume without flags, or with the run's flags.json")
    elif has_run:
        raise RunError(f"{out} already holds a training run",
                       "pass `resume=True` to continue it, or choose another output folder")
    if flags is None:
        raise ConfigError("no model flags given",
                          "pass `flags=NAME` (a preset, a flag dict or a JSON file)")
    flags = ModelFlags.resolve(flags)
    if flags.class_cond:
        raise ConfigError("class-conditional training is not supported",
                          "set class_cond to false")
    return flags, resume and has_run


def _train(images_dir, out_dir, flags, job: TrainJob, device, *, rank: int,
           world_size: int) -> Path:
    main = rank == 0
    out = Path(out_dir).expanduser()
    job.check()
    flags, resuming = _run_flags(out, flags, job.resume)
    images = load_images(images_dir, flags.image_size, progress=job.progress and main)
    trainer = Trainer(images, flags, out, batch_size=int(job.batch_size), lr=float(job.lr),
                      ema=float(job.ema), device=device, seed=job.seed, rank=rank,
                      world_size=world_size)
    if resuming:
        trainer.load()
        if main:
            files.trim_log(out / "train_log.jsonl", trainer.step)
            log.info("resuming %s at step %d", out, trainer.step)
    elif main and world_size > 1:
        log.info("training on %d processes, %d images per process and step", world_size,
                 int(job.batch_size) // world_size)
    out.mkdir(parents=True, exist_ok=True)
    saved_step = _loop(trainer, out, job, main, trainer.step if resuming else -1)
    if saved_step != trainer.step:
        trainer.save(job.samples, job.sample_steps)
    return out


def _loop(trainer: Trainer, out: Path, job: TrainJob, main: bool, saved_step: int) -> int:
    """Steps until ``job.steps`` or its minutes are done (all ranks agree on when), logging
    every ``job.log_every`` steps and saving every ``job.save_every`` minutes; returns the
    step last saved."""
    world_size, dev = trainer.world_size, trainer.device
    start = last_save = time.monotonic()
    deadline = start + job.minutes * 60 if job.minutes is not None else math.inf
    total = int(job.steps) if job.steps is not None else None
    progress = bar(total=total, initial=trainer.step, desc="train", unit="step",
                   progress=job.progress and main)
    meter = _Meter(trainer)
    with open(out / "train_log.jsonl", "a") if main else open(os.devnull, "w") as logf:
        while ((total is None or trainer.step < total)
               and not ddp.agree(time.monotonic() >= deadline, world_size, dev)):
            meter.add(trainer.train_step())
            progress.update(1)
            if trainer.step % job.log_every == 0 or trainer.step == total:
                rec = meter.record()
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                progress.set_postfix(loss=f"{rec['loss']:.4f}",
                                     img_s=f"{rec['images_per_s']:.1f}")
            if ddp.agree(time.monotonic() - last_save >= job.save_every * 60, world_size, dev):
                trainer.save(job.samples, job.sample_steps)
                saved_step = trainer.step
                last_save = time.monotonic()
    progress.close()
    return saved_step


class _Meter:
    """Losses summed over a log interval, and its speed: one train_log.jsonl line."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.acc: dict[str, torch.Tensor] = {}
        self.n, self.since = 0, time.monotonic()

    def add(self, losses: dict) -> None:
        for k, v in losses.items():
            self.acc[k] = self.acc.get(k, 0) + v
        self.n += 1

    def record(self) -> dict:
        """The interval's line (losses averaged over steps and ranks); starts the next one."""
        tr = self.trainer
        acc = ddp.mean_over_ranks(self.acc, tr.world_size)
        now = time.monotonic()
        rec = {"step": tr.step, "epoch": tr.order.epoch}
        rec.update({k: round(float(v) / self.n, 6) for k, v in acc.items()})
        rec["images_per_s"] = round(self.n * tr.batch_size / max(now - self.since, 1e-9), 2)
        rec["threads"] = torch.get_num_threads()
        self.acc, self.n, self.since = {}, 0, now
        return rec


__all__ = ["train_backbone", "Trainer", "TrainJob"]
