"""``fit``: a feature store -> an ensemble of pixel MLPs in a run directory (``run.py``).

Member k seeds torch, numpy and random from ``seed + k`` before building its model, and its
pixel order is a function of that seed too, so a member is the same whether it is trained
alone, after others, after a resume, or on a dask worker.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from distributed import as_completed
from tqdm import tqdm

from ddpmseg.config import Config, check_classes
from ddpmseg.core.device import resolve_device
from ddpmseg.core.cluster import absolute, check_scheduler, session, worker_must_see
from ddpmseg.core.progress import wanted
from ddpmseg.core.errors import RunError, StoreError
from ddpmseg.featcache import content
from ddpmseg.featcache.store import FeatureStore
from ddpmseg.core.fileio import is_no_space, no_space_error
from ddpmseg.core.locking import reader_lock, writer_lock
from ddpmseg.classifier import run as R
from ddpmseg.classifier import sampler as S
from ddpmseg.classifier.model import EarlyStopping, PixelMLP, init_normal, make_trunk, simplex_etf

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
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def build_member(dim: int, num_classes: int, etf: str, seed: int):
    """(classifier, separate ETF trunk or None, ETF matrix or None), built from ``seed``.

    The classifier is built first, so its initial weights do not depend on ``etf``; the
    separate trunk (etf="separate") draws after it; the ETF matrix has its own generator.
    """
    seed_everything(seed)
    model = PixelMLP(dim, num_classes)
    trunk = None
    if etf == "separate":
        trunk = make_trunk(dim, model.widths)
        init_normal(trunk)
    etf_m = simplex_etf(model.penultimate_width, num_classes, seed) if etf != "none" else None
    return model, trunk, etf_m


def train_member(k: int, source, index: S.PixelIndex, cfg: Config, dim: int,
                 num_classes: int, shuffle: int, device: torch.device,
                 progress: bool = True, on_epoch=None,
                 max_steps: int | None = None) -> tuple[dict, dict]:
    """Train member k; returns (state dict on CPU, meta). ``on_epoch(record)`` gets each epoch's
    log record as it finishes. ``max_steps`` cuts training after that many minibatches (for
    benchmarks; a normal fit ends by early stopping or max_epochs)."""
    c = cfg.classifier
    seed = c.seed + k
    model, trunk, etf_m = build_member(dim, num_classes, c.etf, seed)
    model.to(device).train()
    # One optimiser per parameter set: the classifier's updates never see the other trunk.
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    opt_etf = None
    if trunk is not None:
        trunk.to(device).train()
        opt_etf = torch.optim.Adam(trunk.parameters(), lr=c.lr)
    if etf_m is not None:
        etf_m = etf_m.to(device)
    plan = S.EpochPlan(index, shuffle, seed, c.pixels_per_batch)
    stopper = EarlyStopping(c.min_epochs, c.patience)
    steps_total, stop_epoch, early = 0, c.max_epochs - 1, False
    bar = None
    if wanted(progress):
        bar = tqdm(total=len(plan.batch_sizes), file=sys.stderr, leave=False, unit="step",
                   dynamic_ncols=True)
    t_start = time.perf_counter()
    try:
        with source.session(plan) as session:
            for epoch in range(c.max_epochs):
                if bar is not None:
                    bar.reset(total=len(plan.batch_sizes))
                    bar.set_description(f"member {k + 1}/{c.ensemble} epoch {epoch}")
                t0 = time.perf_counter()
                # Loss sums stay on the device: one host sync per step (the early-stopping
                # rule's), not three.
                loss_sum = torch.zeros((), device=device)
                etf_sum = torch.zeros((), device=device)
                ce_sum = 0.0
                steps = pixels = 0
                for x, y in S.batches(plan, session, epoch, device, dim):
                    logits, h = model(x, return_features=True)
                    ce = F.cross_entropy(logits, y)
                    loss = ce
                    etf_loss = None
                    if c.etf == "shared":
                        etf_loss = F.cross_entropy(h @ etf_m, y)
                    elif c.etf == "separate":
                        etf_loss = F.cross_entropy(trunk(x) @ etf_m, y)
                    if etf_loss is not None:
                        loss = ce + c.etf_weight * etf_loss
                    opt.zero_grad(set_to_none=True)
                    if opt_etf is not None:
                        opt_etf.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if opt_etf is not None:
                        opt_etf.step()
                    ce_value = ce.item()
                    if not math.isfinite(ce_value):
                        raise _not_finite_loss(k, epoch, ce_value)
                    ce_sum += ce_value
                    loss_sum += loss.detach()
                    if etf_loss is not None:
                        etf_sum += etf_loss.detach()
                    steps += 1
                    pixels += y.shape[0]
                    if bar is not None:
                        bar.update(1)
                        if steps % 50 == 0:
                            rate = pixels / max(time.perf_counter() - t0, 1e-9)
                            bar.set_postfix(loss=f"{ce_value:.4f}", px_s=f"{rate:,.0f}",
                                            refresh=False)
                    # The reference's rule, on the classification loss (in "separate" mode the
                    # other trunk's loss must not change when the classifier stops).
                    if stopper.step(epoch, ce_value):
                        early = True
                        break
                    if max_steps is not None and steps_total + steps >= max_steps:
                        break
                seconds = time.perf_counter() - t0
                steps_total += steps
                if not bool(torch.isfinite(loss_sum)):
                    raise _not_finite_loss(k, epoch, float(loss_sum))
                record = {"member": k, "epoch": epoch, "loss": loss_sum.item() / max(steps, 1),
                          "ce": ce_sum / max(steps, 1), "steps": steps, "pixels": pixels,
                          "pixels_per_s": pixels / max(seconds, 1e-9), "seconds": seconds,
                          "threads": torch.get_num_threads()}
                if c.etf != "none":
                    record["etf_loss"] = etf_sum.item() / max(steps, 1)
                if on_epoch is not None:
                    on_epoch(record)
                if early or (max_steps is not None and steps_total >= max_steps):
                    stop_epoch = epoch
                    break
    finally:
        if bar is not None:
            bar.close()
    meta = {"format": R.MEMBER_FORMAT, "member": k, "seed": seed, "dim": dim,
            "num_classes": num_classes, "widths": list(model.widths), "etf": c.etf,
            "etf_weight": c.etf_weight, "stop_epoch": stop_epoch, "early_stop": early,
            "steps": steps_total, "shuffle_images": shuffle,
            "pixels_per_epoch": plan.pixels_per_epoch,
            "seconds": time.perf_counter() - t_start, "device": str(device),
            "threads": torch.get_num_threads()}
    state = {key: v.detach().cpu().clone() for key, v in model.state_dict().items()}
    return state, meta


def _not_finite_loss(k: int, epoch: int, value: float) -> RunError:
    return RunError(f"member {k}, epoch {epoch}: the training loss is {value} (not finite); "
                    "nothing of this member was saved",
                    "check the store with `ddpmseg verify STORE`, or lower --lr")


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
                      "with, or leave --config out to use the store's own")
    return config


def _make_source(store, index, device, shuffle, in_memory: bool):
    if in_memory:
        return S.InMemorySource(store, index, device)
    return S.StreamSource(store, index, device, shuffle)


def fit(store, run_dir, config: Config | None = None, *, device="auto", in_memory: bool = False,
        resume: bool = True, scheduler: str | None = None, progress: bool = True) -> Path:
    """Train ``config.classifier.ensemble`` pixel MLPs on a store's labelled pixels.

    ``config`` None: the config the store was extracted with (``training_config``).

    ``store`` is a path (or URL) or an open FeatureStore. A run dir that already holds members
    trained on the same store with the same settings is resumed (``resume=False`` starts
    over). ``in_memory`` holds the dense features of all labelled pixels in RAM (the reference's
    way) instead of streaming them from a pool bounded by ``classifier.ram_budget_gb``; both
    give the same minibatches. ``scheduler`` ("local", "local:N" or a dask scheduler address)
    trains the members as dask.distributed tasks. Returns the run dir.

    Each member seeds torch's, numpy's and random's global generators with ``seed + k``.
    """
    check_scheduler(scheduler)  # before the run dir is made
    # The store is read under its shared lock, taken before it is opened: an extract at work
    # (a --compact swaps a new store in under its path) is named at once, and none starts
    # until the fit is done. Unlocked, the fit read the swapped-in store's chunks by its old
    # indices and called the ones it did not find damage.
    with reader_lock(getattr(store, "path", store), "store"):
        return _fit(store, run_dir, config, device, in_memory, resume, scheduler, progress)


def _fit(store, run_dir, config: Config, device, in_memory: bool, resume: bool,
         scheduler: str | None, progress: bool) -> Path:
    store = _open_store(store)
    check_trainable(store)
    config = training_config(store, config)
    info = store.info
    cfg = R.resolved_config(config, info, store.config.get("model"))
    c = cfg.classifier
    run_dir = Path(run_dir)
    dev = resolve_device(device)

    index = S.PixelIndex.from_store(store)
    if index.total < 2:
        raise StoreError(f"{store.path}: {index.total} labelled pixel(s); training needs at "
                         "least 2", "check the masks and the ignore label")
    per_image = S.image_bytes(info)
    shuffle = S.shuffle_images(len(index.images), per_image, c.ram_budget_gb * GIB)
    if not in_memory and 2 * per_image > c.ram_budget_gb * GIB and shuffle < len(index.images):
        log.warning("RAM budget %.2f GB is below two images' maps (%.0f MB each): the pool holds "
                    "2 images anyway", c.ram_budget_gb, per_image / 2 ** 20)

    with writer_lock(run_dir, "run dir"):
        try:
            return _fit_locked(store, run_dir, cfg, index, info, dev, device, in_memory,
                               resume, shuffle, scheduler, progress)
        except OSError as exc:
            if not is_no_space(exc):
                raise
            raise no_space_error(run_dir, _member_bytes(info), "the run dir",
                                 "one member") from exc


def _member_bytes(info) -> int:
    dim, c = info.feature_dim, info.num_classes
    widths = (128, 32) if c < 30 else (256, 128)
    return 4 * 3 * (dim * widths[0] + widths[0] * widths[1] + widths[1] * c) + 2 ** 16


def _fit_locked(store, run_dir, cfg, index, info, dev, device, in_memory, resume, shuffle,
                scheduler, progress) -> Path:
    c = cfg.classifier
    images = content.image_set(store)
    R.prepare(run_dir, cfg, info, resume, shuffle, images)
    R.write_header(run_dir, cfg, store.path, info, images)
    trained = set(R.trained_members(run_dir, c.ensemble))
    todo = [k for k in range(c.ensemble) if k not in trained]

    def logger(record: dict) -> None:
        R.append_log(run_dir, record)

    if not todo:
        log.info("all %d members of %s are trained", c.ensemble, run_dir)
        return run_dir
    done = c.ensemble - len(todo)
    log.info("fit: %d labelled pixels in %d images, %d dims, %d classes; %s, shuffling %d "
             "image(s) at a time; training %d member(s)%s on %s", index.total,
             len(index.images), info.feature_dim, info.num_classes,
             "in memory" if in_memory else "streaming", shuffle, len(todo),
             f" (resuming after {done})" if done else "", dev)
    if done:
        logger({"event": "resume", "members_done": done, "time": time.time()})

    if in_memory:
        log.info("in memory: %.1f GB of float32 features (%d pixels x %d dims)",
                 index.total * info.feature_dim * 4 / GIB, index.total, info.feature_dim)
    if scheduler:
        _fit_distributed(store, run_dir, cfg, todo, str(device), in_memory, shuffle, scheduler,
                         logger, progress)
        return run_dir

    source = _make_source(store, index, dev, shuffle, in_memory)
    try:
        for k in todo:
            state, meta = train_member(k, source, index, cfg, info.feature_dim,
                                       info.num_classes, shuffle, dev, progress, logger)
            R.write_member(run_dir, k, state, meta)
            logger(_done_record(meta))
            # stop_epoch is stored 0-based; people count epochs from 1.
            log.info("member %d/%d: stopped after epoch %d of at most %d (%s), %d steps, %.1f s",
                     k + 1, c.ensemble, meta["stop_epoch"] + 1, c.max_epochs,
                     "early stop" if meta["early_stop"] else "max epochs", meta["steps"],
                     meta["seconds"])
    finally:
        source.close()
    return run_dir


def _done_record(meta: dict) -> dict:
    return {"member": meta["member"], "done": True, "stop_epoch": meta["stop_epoch"],
            "early_stop": meta["early_stop"], "steps": meta["steps"],
            "seconds": meta["seconds"]}


# -- dask.distributed -----------------------------------------------------------------------
def _member_task(store_path: str, cfg_dict: dict, k: int, device: str, in_memory: bool,
                 shuffle: int, threads: int):
    """One member, on a dask worker: opens the store itself, returns (state, meta, log)."""
    worker_must_see(store_path, "the feature store")
    if threads:
        torch.set_num_threads(threads)
    cfg = Config.from_dict(cfg_dict, source="run config")
    store = FeatureStore.open(store_path)
    info = store.info
    index = S.PixelIndex.from_store(store)
    dev = resolve_device(device)
    source = _make_source(store, index, dev, shuffle, in_memory)
    records = []
    try:
        state, meta = train_member(k, source, index, cfg, info.feature_dim, info.num_classes,
                                   shuffle, dev, progress=False, on_epoch=records.append)
    finally:
        source.close()
    return state, meta, records


def _fit_distributed(store, run_dir, cfg, todo, device, in_memory, shuffle, scheduler, logger,
                     progress):
    with session(scheduler, max(1, min(os.cpu_count() or 1, 4)), f"training {run_dir}",
                 "the members already trained are kept") as client:
        threads = torch.get_num_threads()
        # Absolute: a tcp:// scheduler's workers run in folders of their own.
        futures = [client.submit(_member_task, absolute(store.path), cfg.to_dict(), k, device,
                                 in_memory, shuffle, threads, pure=False,
                                 key=f"ddpmseg-fit-member-{k}-{os.getpid()}-{time.time_ns()}")
                   for k in todo]
        bar = None
        if wanted(progress):
            bar = tqdm(total=len(todo), file=sys.stderr, desc="members", unit="member")
        try:
            for fut in as_completed(futures):
                state, meta, records = fut.result()
                k = meta["member"]
                R.write_member(run_dir, k, state, meta)
                for r in records:
                    logger(r)
                logger(_done_record(meta))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
