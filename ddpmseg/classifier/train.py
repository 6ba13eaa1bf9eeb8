"""``fit``: a feature store -> an ensemble of pixel MLPs in a run directory (``run.py``).

Member k draws its initial weights from torch's generator seeded with ``seed + k`` (inside
``fork_rng``: the caller's random state is left alone), and its pixel order is a function of
that seed too, so a member is the same whether it is trained alone, after others, after a
resume, or on a dask worker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddpmseg.classifier import sampler
from ddpmseg.classifier.model import (
    EarlyStopping,
    PixelMLP,
    hidden_widths,
    init_normal,
    make_trunk,
    simplex_etf,
)
from ddpmseg.classifier.run import (
    MEMBER_FORMAT,
    append_log,
    prepare,
    resolved_config,
    trained_members,
    write_header,
    write_member,
)
from ddpmseg.config import ClassifierConfig, Config, check_classes
from ddpmseg.core.cluster import absolute, check_scheduler, run_tasks, worker_must_see
from ddpmseg.core.device import resolve_device, use_threads
from ddpmseg.core.errors import RunError, StoreError
from ddpmseg.core.fileio import is_no_space, no_space_error
from ddpmseg.core.locking import reader_lock, writer_lock
from ddpmseg.core.progress import bar
from ddpmseg.featcache import content
from ddpmseg.featcache.store import FeatureStore, StoreInfo

log = logging.getLogger(__name__)

GIB = 1024 ** 3


# -- checks ---------------------------------------------------------------------------------
def check_trainable(store: FeatureStore) -> None:
    info = store.info
    if not info.has_labels:
        raise StoreError(f"{store.path} holds no labels (its images had no masks)",
                         "extract a folder of images with their label maps to train on")
    if len(store) == 0:
        raise StoreError(f"{store.path} holds no images", "extract a folder with images")
    done = store.complete() | ~content.active_mask(store)  # pruned images are never read
    if not done.all():
        missing = [info.names[i] for i in np.flatnonzero(~done)[:5]]
        raise StoreError(f"{store.path}: {int((~done).sum())} of {len(store)} images are not "
                         f"completely extracted (e.g. {', '.join(missing)})",
                         "rerun the same `ddpmseg extract` command to finish the store")


# -- training one member --------------------------------------------------------------------
@dataclass(frozen=True)
class MemberJob:
    """What every member of one fit shares: member k is ``train_member(job, k, ...)``."""

    classifier: ClassifierConfig
    dim: int                       # features per pixel
    num_classes: int
    shuffle: int                   # images shuffled together (``sampler.shuffle_images``)
    device: torch.device
    progress: bool = True
    max_steps: int | None = None   # cut training after that many minibatches (benchmarks)


def build_member(dim: int, num_classes: int, etf: str, seed: int):
    """(classifier, separate ETF trunk or None, ETF matrix or None), built from ``seed``.

    The classifier is built first, so its initial weights do not depend on ``etf``; the
    separate trunk (etf="separate") draws after it; the ETF matrix has its own generator.
    Modules draw their initial weights from torch's CPU generator, seeded with ``seed`` inside
    ``fork_rng``: the caller's random state is as it was afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        model = PixelMLP(dim, num_classes)
        trunk = None
        if etf == "separate":
            trunk = make_trunk(dim, model.widths)
            init_normal(trunk)
    etf_m = simplex_etf(model.penultimate_width, num_classes, seed) if etf != "none" else None
    return model, trunk, etf_m


@dataclass
class _Nets:
    """One member's networks and optimisers while it trains."""

    model: PixelMLP
    trunk: torch.nn.Module | None
    etf_m: torch.Tensor | None
    opt: torch.optim.Optimizer
    opt_etf: torch.optim.Optimizer | None

    @classmethod
    def build(cls, job: MemberJob, seed: int) -> _Nets:
        model, trunk, etf_m = build_member(job.dim, job.num_classes, job.classifier.etf, seed)
        model.to(job.device).train()
        # One optimiser per parameter set: the classifier's updates never see the other trunk.
        opt = torch.optim.Adam(model.parameters(), lr=job.classifier.lr)
        opt_etf = None
        if trunk is not None:
            trunk.to(job.device).train()
            opt_etf = torch.optim.Adam(trunk.parameters(), lr=job.classifier.lr)
        if etf_m is not None:
            etf_m = etf_m.to(job.device)
        return cls(model, trunk, etf_m, opt, opt_etf)

    def step(self, x: torch.Tensor, y: torch.Tensor, c: ClassifierConfig):
        """One optimiser step on a minibatch: (classification loss, loss, ETF loss or None)."""
        logits, h = self.model(x, return_features=True)
        ce = F.cross_entropy(logits, y)
        loss = ce
        etf_loss = None
        if c.etf == "shared":
            etf_loss = F.cross_entropy(h @ self.etf_m, y)
        elif c.etf == "separate":
            etf_loss = F.cross_entropy(self.trunk(x) @ self.etf_m, y)
        if etf_loss is not None:
            loss = ce + c.etf_weight * etf_loss
        self.opt.zero_grad(set_to_none=True)
        if self.opt_etf is not None:
            self.opt_etf.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.opt_etf is not None:
            self.opt_etf.step()
        return ce, loss, etf_loss


class _EpochStats:
    """One epoch's sums. The loss sums stay on the device: one host sync per step (the
    early-stopping rule's), not three."""

    def __init__(self, device: torch.device):
        self.t0 = time.perf_counter()
        self.loss_sum = torch.zeros((), device=device)
        self.etf_sum = torch.zeros((), device=device)
        self.ce_sum = 0.0
        self.steps = self.pixels = 0

    def add(self, ce_value: float, loss: torch.Tensor, etf_loss, pixels: int) -> None:
        self.ce_sum += ce_value
        self.loss_sum += loss.detach()
        if etf_loss is not None:
            self.etf_sum += etf_loss.detach()
        self.steps += 1
        self.pixels += pixels

    def record(self, k: int, epoch: int, etf: str) -> dict:
        """The epoch's train_log.jsonl line; a RunError if its loss was not finite."""
        seconds = time.perf_counter() - self.t0
        if not bool(torch.isfinite(self.loss_sum)):
            raise _not_finite_loss(k, epoch, float(self.loss_sum))
        steps = max(self.steps, 1)
        record = {"member": k, "epoch": epoch, "loss": self.loss_sum.item() / steps,
                  "ce": self.ce_sum / steps, "steps": self.steps, "pixels": self.pixels,
                  "pixels_per_s": self.pixels / max(seconds, 1e-9), "seconds": seconds,
                  "threads": torch.get_num_threads()}
        if etf != "none":
            record["etf_loss"] = self.etf_sum.item() / steps
        return record


def _train_epoch(job: MemberJob, k: int, epoch: int, nets: _Nets, batches, stopper,
                 steps_bar, steps_before: int) -> tuple[_EpochStats, bool]:
    """Train one epoch on ``batches``; (its sums, whether early stopping ended it)."""
    stats = _EpochStats(job.device)
    for x, y in batches:
        ce, loss, etf_loss = nets.step(x, y, job.classifier)
        ce_value = ce.item()
        if not math.isfinite(ce_value):
            raise _not_finite_loss(k, epoch, ce_value)
        stats.add(ce_value, loss, etf_loss, y.shape[0])
        steps_bar.update(1)
        if stats.steps % 50 == 0:
            rate = stats.pixels / max(time.perf_counter() - stats.t0, 1e-9)
            steps_bar.set_postfix(loss=f"{ce_value:.4f}", px_s=f"{rate:,.0f}", refresh=False)
        # The reference's rule, on the classification loss (in "separate" mode the other
        # trunk's loss must not change when the classifier stops).
        if stopper.step(epoch, ce_value):
            return stats, True
        if job.max_steps is not None and steps_before + stats.steps >= job.max_steps:
            break
    return stats, False


def train_member(job: MemberJob, k: int, source, index: sampler.PixelIndex,
                 on_epoch=None) -> tuple[dict, dict]:
    """Train member k; returns (state dict on CPU, meta). ``on_epoch(record)`` gets each epoch's
    log record as it finishes. Member k is a function of ``job`` and k alone: its weights are
    drawn from seed + k, and its pixel order too."""
    c = job.classifier
    seed = c.seed + k
    nets = _Nets.build(job, seed)
    plan = sampler.EpochPlan(index, job.shuffle, seed, c.pixels_per_batch)
    stopper = EarlyStopping(c.min_epochs, c.patience)
    steps_total, stop_epoch, early = 0, c.max_epochs - 1, False
    t_start = time.perf_counter()
    with bar(total=len(plan.batch_sizes), desc=f"member {k + 1}/{c.ensemble}", unit="step",
             progress=job.progress, leave=False) as steps_bar, source.session(plan) as session:
        for epoch in range(c.max_epochs):
            steps_bar.reset(total=len(plan.batch_sizes))
            steps_bar.set_description(f"member {k + 1}/{c.ensemble} epoch {epoch}")
            batches = sampler.batches(plan, session, epoch, job.device, job.dim)
            stats, early = _train_epoch(job, k, epoch, nets, batches, stopper, steps_bar,
                                        steps_total)
            steps_total += stats.steps
            record = stats.record(k, epoch, c.etf)
            if on_epoch is not None:
                on_epoch(record)
            if early or (job.max_steps is not None and steps_total >= job.max_steps):
                stop_epoch = epoch
                break
    meta = {"format": MEMBER_FORMAT, "member": k, "seed": seed, "dim": job.dim,
            "num_classes": job.num_classes, "widths": list(nets.model.widths), "etf": c.etf,
            "etf_weight": c.etf_weight, "stop_epoch": stop_epoch, "early_stop": early,
            "steps": steps_total, "shuffle_images": job.shuffle,
            "pixels_per_epoch": plan.pixels_per_epoch,
            "seconds": time.perf_counter() - t_start, "device": str(job.device),
            "threads": torch.get_num_threads()}
    state = {key: v.detach().cpu().clone() for key, v in nets.model.state_dict().items()}
    return state, meta


def _not_finite_loss(k: int, epoch: int, value: float) -> RunError:
    return RunError(f"member {k}, epoch {epoch}: the training loss is {value} (not finite); "
                    "nothing of this member was saved",
                    "check the store with verify, or lower the learning rate (`lr=LR`)")


# -- fit ------------------------------------------------------------------------------------
def _open_store(store) -> FeatureStore:
    return store if isinstance(store, FeatureStore) else FeatureStore.open(store)


def store_config(store: FeatureStore) -> tuple[Config, str]:
    """The config a store was extracted with (defaults for a store that records none), and
    where it came from, as ``fit`` says it."""
    recorded = store.recorded_config()
    if recorded is None:
        return Config(), "defaults: the store records no config"
    return recorded, "from the store"


def training_config(store: FeatureStore, config: Config | None) -> Config:
    """The config ``fit`` trains with: ``config``, else the store's own. A config that names
    classes (``DataConfig.names_classes``) must name the store's: the run's classes are
    always the store's, so another data set's config would only lend the run its name and
    classifier settings."""
    if config is None:
        return store_config(store)[0]
    if config.data.names_classes:
        info = store.info
        check_classes(config.data, f"config {config.data.name}", info.num_classes,
                      info.ignore_label, info.class_names, f"store {store.path}",
                      "fit takes the classes from the store: give the config it was extracted "
                      "with, or none to use the store's own")
    return config


def _make_source(store, index, device, shuffle, in_memory: bool, c: ClassifierConfig):
    return sampler.make_source(store, index, device, shuffle, c.ram_budget_gb * GIB, in_memory)


def fit(store, run_dir, config: Config | None = None, *, device="auto", in_memory: bool = False,
        overwrite: bool = False, scheduler: str | None = None, progress: bool = True,
        threads: int | None = None, resume: bool | None = None) -> Path:
    """Train ``config.classifier.ensemble`` pixel MLPs on a store's labelled pixels.

    ``config`` None: the config the store was extracted with (``training_config``).

    ``store`` is a path (or URL) or an open FeatureStore. A run dir that already holds members
    trained on the same store with the same settings is resumed (``overwrite=True`` starts
    over; ``resume=False`` is its old spelling, kept for one release). ``in_memory`` holds the
    dense features of all labelled pixels in RAM (the reference's way) instead of streaming
    them from a pool bounded by ``classifier.ram_budget_gb``; both give the same minibatches.
    ``scheduler`` ("local", "local:N" or a dask scheduler address) trains the members as
    dask.distributed tasks. ``threads``: torch's CPU threads while it trains (None: as
    ``core.device.set_threads`` chooses for fit); the caller's setting is restored after.
    Returns the run dir.

    Member k draws its initial weights from a generator seeded with ``seed + k``; the global
    random generators are left alone.
    """
    if resume is not None:
        overwrite = not resume
    check_scheduler(scheduler)  # before the run dir is made
    # The store is read under its shared lock, taken before it is opened: an extract at work
    # (a --compact swaps a new store in under its path) is named at once, and none starts
    # until the fit is done. Unlocked, the fit read the swapped-in store's chunks by its old
    # indices and called the ones it did not find damage.
    with use_threads(threads, "fit"), reader_lock(getattr(store, "path", store), "store"):
        job = _prepare_fit(store, run_dir, config, device=device, in_memory=in_memory,
                           overwrite=overwrite, scheduler=scheduler, progress=progress)
        with writer_lock(job.run_dir, "run dir"):
            try:
                return _fit_locked(job)
            except OSError as exc:
                if not is_no_space(exc):
                    raise
                raise no_space_error(job.run_dir, _member_bytes(job.info), "the run dir",
                                     "one member") from exc


@dataclass(frozen=True)
class FitJob:
    """One fit, resolved and checked: what ``_fit_locked`` trains, from where, into where."""

    store: FeatureStore
    run_dir: Path
    config: Config                # the run's (``run.resolved_config``)
    index: sampler.PixelIndex
    device: torch.device          # resolved here
    device_name: str              # as asked: each dask worker resolves it for itself
    in_memory: bool
    overwrite: bool
    shuffle: int                  # images shuffled together
    scheduler: str | None
    progress: bool

    @property
    def info(self) -> StoreInfo:
        return self.store.info

    def member_job(self) -> MemberJob:
        return MemberJob(self.config.classifier, self.info.feature_dim, self.info.num_classes,
                         self.shuffle, self.device, self.progress)


def _prepare_fit(store, run_dir, config: Config | None, *, device, in_memory: bool,
                 overwrite: bool, scheduler: str | None, progress: bool) -> FitJob:
    """The store opened and checked, the run's config and the pixel index: the fit's job."""
    store = _open_store(store)
    check_trainable(store)
    config = training_config(store, config)
    info = store.info
    cfg = resolved_config(config, info, store.config.get("model"))
    c = cfg.classifier
    dev = resolve_device(device)
    index = sampler.PixelIndex.from_store(store)
    if index.total < 2:
        raise StoreError(f"{store.path}: {index.total} labelled pixel(s); training needs at "
                         "least 2", "check the masks and the ignore label")
    per_image = sampler.image_bytes(info)
    shuffle = sampler.shuffle_images(len(index.images), per_image, c.ram_budget_gb * GIB)
    if not in_memory and 2 * per_image > c.ram_budget_gb * GIB and shuffle < len(index.images):
        log.warning("RAM budget %.2f GB is below two images' maps (%.0f MB each): the pool holds "
                    "2 images anyway", c.ram_budget_gb, per_image / 2 ** 20)
    return FitJob(store, Path(run_dir), cfg, index, dev, str(device),
                  in_memory, overwrite, shuffle, scheduler, progress)


def _member_bytes(info) -> int:
    """About one member file's size, at most: what the full-disk message says is needed."""
    dim, c = info.feature_dim, info.num_classes
    widths = hidden_widths(c)
    return 4 * 3 * (dim * widths[0] + widths[0] * widths[1] + widths[1] * c) + 2 ** 16


def _fit_locked(job: FitJob) -> Path:
    c, info, run_dir = job.config.classifier, job.info, job.run_dir
    images = content.image_set(job.store)
    prepare(run_dir, job.config, info, not job.overwrite, job.shuffle, images)
    write_header(run_dir, job.config, job.store.path, info, images)
    trained = set(trained_members(run_dir, c.ensemble))
    todo = [k for k in range(c.ensemble) if k not in trained]
    if not todo:
        log.info("all %d members of %s are trained", c.ensemble, run_dir)
        return run_dir
    done = c.ensemble - len(todo)
    log.info("fit: %d labelled pixels in %d images, %d dims, %d classes; %s, shuffling %d "
             "image(s) at a time; training %d member(s)%s on %s", job.index.total,
             len(job.index.images), info.feature_dim, info.num_classes,
             "in memory" if job.in_memory else "streaming", job.shuffle, len(todo),
             f" (resuming after {done})" if done else "", job.device)
    if done:
        append_log(run_dir, {"event": "resume", "members_done": done, "time": time.time()})
    if job.in_memory:
        log.info("in memory: %.1f GB of float32 features (%d pixels x %d dims)",
                 job.index.total * info.feature_dim * 4 / GIB, job.index.total,
                 info.feature_dim)
    if job.scheduler:
        _fit_distributed(job, todo)
    else:
        _fit_here(job, todo)
    return run_dir


def _fit_here(job: FitJob, todo: list[int]) -> None:
    """Train the members ``todo`` one after the other in this process."""
    c = job.config.classifier
    source = _make_source(job.store, job.index, job.device, job.shuffle, job.in_memory, c)
    try:
        for k in todo:
            state, meta = train_member(job.member_job(), k, source, job.index,
                                       lambda record: append_log(job.run_dir, record))
            write_member(job.run_dir, k, state, meta)
            append_log(job.run_dir, _done_record(meta))
            # stop_epoch is stored 0-based; people count epochs from 1.
            log.info("member %d/%d: stopped after epoch %d of at most %d (%s), %d steps, %.1f s",
                     k + 1, c.ensemble, meta["stop_epoch"] + 1, c.max_epochs,
                     "early stop" if meta["early_stop"] else "max epochs", meta["steps"],
                     meta["seconds"])
    finally:
        source.close()


def _done_record(meta: dict) -> dict:
    return {"member": meta["member"], "done": True, "stop_epoch": meta["stop_epoch"],
            "early_stop": meta["early_stop"], "steps": meta["steps"],
            "seconds": meta["seconds"]}


# -- dask.distributed -----------------------------------------------------------------------
def _member_task(store_path: str, cfg_dict: dict, k: int, device: str, in_memory: bool,
                 shuffle: int):
    """One member, on a dask worker: opens the store itself, returns (state, meta, log)."""
    worker_must_see(store_path, "the feature store")
    cfg = Config.from_dict(cfg_dict, source="run config")
    store = FeatureStore.open(store_path)
    info = store.info
    index = sampler.PixelIndex.from_store(store)
    dev = resolve_device(device)
    job = MemberJob(cfg.classifier, info.feature_dim, info.num_classes, shuffle, dev,
                    progress=False)
    source = _make_source(store, index, dev, shuffle, in_memory, cfg.classifier)
    records = []
    try:
        state, meta = train_member(job, k, source, index, on_epoch=records.append)
    finally:
        source.close()
    return state, meta, records


def _fit_distributed(job: FitJob, todo: list[int]) -> None:
    run_dir = job.run_dir
    # Absolute: a tcp:// scheduler's workers run in folders of their own.
    calls = [(absolute(job.store.path), job.config.to_dict(), k, job.device_name, job.in_memory,
              job.shuffle) for k in todo]
    results = run_tasks(job.scheduler, _member_task, calls, name="fit-member",
                        threads=torch.get_num_threads(),
                        default_workers=max(1, min(os.cpu_count() or 1, 4)),
                        doing=f"training {run_dir}", kept="the members already trained are kept")
    with contextlib.closing(results), bar(total=len(todo), desc="members", unit="member",
                                          progress=job.progress) as members:
        for state, meta, records in results:
            write_member(run_dir, meta["member"], state, meta)
            for r in records:
                append_log(run_dir, r)
            append_log(run_dir, _done_record(meta))
            members.update(1)
