"""What a store's images are: per-image content hashes, inactive images, and how a store
follows a data folder that changes between two ``extract`` runs.

In a format 4 store these live in the ``image_records`` array (``featcache.image_records``;
``store.images_attribute`` and ``store.record`` hide which); in formats 1-3 the group attribute
``"images"`` holds ``{"hashes": {name: [image sha256, mask sha256 or
null]}, "inactive": [names]}`` and, from stores that record them, ``"sizes": {name: [height,
width, resize mode or null]}``: each image's size as shown (EXIF applied) and how it was fitted
to the model (``spec.RESIZE_MODES``; null when it was the model's size), so that predictions
from the store come out at the image's own size. The store order (``StoreInfo.names``) is insertion order: a
rerun appends new images at the end. Comparing the folder's hashes with the recorded ones
tells the cases apart:

- a name not in the store: appended (arrays grow; no existing chunk is touched);
- the image bytes changed: the image is flagged incomplete and re-extracted (maps and labels);
- only the mask bytes changed: its labels chunk is rewritten, nothing else;
- a stored name missing from the folder: refused, unless ``prune`` marks it inactive (kept on
  disk, never trained on). ``compact`` then rewrites the store without inactive images.

Every step is ordered so that a run killed at any point and rerun on the same folder ends in
the same store: flags and labels are written first, the arrays are grown next, and the
attributes (names, hashes) last, in one write. Until that write the old hashes stand, so a
rerun sees the same differences and redoes the same (idempotent) steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddpmseg.core.errors import BadInputError, StoreError
from ddpmseg.core.fileio import atomic_write, is_url, json_sha256, sha256_file
from ddpmseg.featcache.store import FeatureStore, StoreInfo
from ddpmseg.spec import short

log = logging.getLogger(__name__)


def sample_hashes(samples, cache: "StatCache | None" = None) -> dict[str, list]:
    """{name: [image sha256, mask sha256 or None]} of ``data.Sample``s. With a ``cache``
    (``StatCache.load``), a file whose stat has not changed since it was hashed takes its
    recorded hash instead of being read."""
    digest = sha256_file if cache is None else cache.sha256
    return {s.name: [digest(s.image), digest(s.mask) if s.mask is not None else None]
            for s in samples}


# -- stat before hash ------------------------------------------------------------------------

def stat_cache_path(store_path) -> Path:
    """The stat cache of a local store: the hidden file ``.<store name>.stat_cache.json``
    beside it (as its writer lock is; inside, zarr would take it for a member)."""
    p = Path(os.path.realpath(store_path))
    return p.with_name(f".{p.name}.stat_cache.json")


# A file modified less than this before its stat was recorded is "racily clean" (git's term):
# a change within the same timestamp tick would keep its size and mtime, so it is hashed again
# until its stat is older than that (filesystem timestamps are coarser than their ns field).
RACY_NS = 2_000_000_000


def file_stat(path) -> list[int]:
    """What says a file changed without reading it: size, mtime_ns, ctime_ns, inode. A write
    sets ctime to the current time, and no program can set it back (``touch -d`` and
    ``os.utime`` restore mtime only), so a same-size change with a restored mtime is seen."""
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns), int(st.st_ino)]


@dataclass
class StatCache:
    """Per data file, [size, mtime_ns, ctime_ns, inode, sha256] as last hashed, and when those
    stats were taken (``checked_ns``): a local store's stat cache, git's index for
    the folder (``stat_cache_path``). It is a cache, not content: the store's digests never cover it, a damaged or
    missing one means hashing every file again, and it is left out of byte comparisons."""

    path: Path | None
    files: dict
    checked_ns: int = 0
    changed: bool = False
    _stats: dict = field(default_factory=dict)
    # When this run began taking stats: recorded as the new checked_ns (a stat is never
    # older than the time recorded for it, so the racy rule errs towards hashing).
    started_ns: int = field(default_factory=time.time_ns)

    @classmethod
    def load(cls, store_path) -> "StatCache":
        if is_url(store_path):
            return cls(None, {})
        path = stat_cache_path(store_path)
        try:
            raw = json.loads(path.read_text())
            if json_sha256(raw["files"]) == raw["digest"]:
                return cls(path, dict(raw["files"]), int(raw["checked_ns"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return cls(path, {}, 0, changed=True)   # none, or damaged: hash every file

    def unchanged(self, path) -> bool:
        """Whether a file's stat is the one recorded when it was last hashed, and was not
        racily clean then (so its bytes, and the checks made on them, are the same)."""
        key = os.path.abspath(path)
        self._stats[key] = file_stat(path)   # kept for ``sha256`` in the same run
        return self._known(key, self._stats[key]) is not None

    def _known(self, key: str, st: list[int]) -> str | None:
        old = self.files.get(key)
        racy = self.checked_ns - RACY_NS
        if old and old[:4] == st and st[1] < racy and st[2] < racy:
            return old[4]
        return None

    def sha256(self, path) -> str:
        key = os.path.abspath(path)
        st = self._stats.pop(key, None) or file_stat(path)
        known = self._known(key, st)
        if known is not None:
            return known
        digest = sha256_file(path)
        self.changed = True   # new stats, or a racy entry's (checked_ns moves on)
        self.files[key] = st + [digest]
        return digest

    def save(self) -> None:
        """Record the stats (taken after ``started_ns``) when any file was hashed."""
        if self.path is None or not self.changed:
            return
        text = json.dumps({"checked_ns": self.started_ns, "files": self.files,
                           "digest": json_sha256(self.files)},
                          separators=(",", ":"))
        atomic_write(self.path, lambda p: p.write_text(text))
        self.changed = False


@dataclass(frozen=True)
class ImageState:
    """The recorded content of a store: hashes by name (may lack legacy images) and the
    names that are inactive."""

    hashes: dict
    inactive: tuple[str, ...] = ()
    sizes: dict = dataclasses.field(default_factory=dict)  # {name: [H, W, mode or None]}

    def to_json(self) -> dict:
        out = {"hashes": {k: list(v) for k, v in self.hashes.items()},
               "inactive": list(self.inactive)}
        if self.sizes:
            out["sizes"] = {k: list(v) for k, v in self.sizes.items()}
        return out

    @classmethod
    def from_json(cls, raw: dict | None) -> "ImageState":
        raw = raw or {}
        return cls({k: list(v) for k, v in raw.get("hashes", {}).items()},
                   tuple(raw.get("inactive", ())),
                   {k: list(v) for k, v in raw.get("sizes", {}).items()})


def read_state(store: FeatureStore) -> ImageState:
    return ImageState.from_json(store.images_attribute())


def active_mask(store: FeatureStore) -> np.ndarray:
    """(N,) bool: the images a fit may train on (not pruned)."""
    inactive = set(read_state(store).inactive)
    return np.array([n not in inactive for n in store.names], dtype=bool)


def image_set(store: FeatureStore) -> dict[str, list]:
    """The active images of a store with their hashes ([None, None] where none is recorded):
    what a run trained on this store records."""
    state = read_state(store)
    return {n: list(state.hashes.get(n, [None, None]))
            for n, ok in zip(store.names, active_mask(store)) if ok}


def write_state(store: FeatureStore, info: StoreInfo, state: ImageState) -> None:
    """Record the store's info (names, count) and image state in one attribute write."""
    store.record(info, state.to_json())


def image_set_changes(old: dict, new: dict) -> list[str]:
    """Readable differences between two image sets ({name: [image, mask] hashes})."""
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    both = [n for n in old if n in new]
    images = [n for n in both if old[n][0] != new[n][0]]
    masks = [n for n in both if old[n][0] == new[n][0] and old[n][1] != new[n][1]]
    out = []
    for what, names in (("added", added), ("removed or pruned", removed),
                        ("with other pixels", images), ("with another mask", masks)):
        if names:
            out.append(f"{len(names)} image(s) {what}: {short(names)}")
    return out


# -- following a folder ----------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How the store must change to follow the folder (store indices unless said)."""

    names: tuple[str, ...]        # the store order after the change
    hashes: dict                  # the hashes to record
    inactive: tuple[str, ...]
    new: tuple[str, ...] = ()
    reextract: tuple[int, ...] = ()
    relabel: tuple[int, ...] = ()
    pruned: tuple[str, ...] = ()
    backfilled: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = []
        for what, n in (("new", len(self.new)), ("re-extracted (pixels changed)",
                        len(self.reextract)), ("relabelled (mask changed)", len(self.relabel)),
                        ("pruned", len(self.pruned))):
            if n:
                parts.append(f"{n} {what}")
        return ", ".join(parts)


def plan(store: FeatureStore, folder_hashes: dict, prune: bool) -> Plan:
    """Compare a folder ({name: hashes}, sorted by name) with a store. Writes nothing; raises
    ``BadInputError`` naming the images that left the folder unless ``prune``."""
    state = read_state(store)
    stored = list(store.names)
    inactive = set(state.inactive)
    gone = [n for n in stored if n not in folder_hashes and n not in inactive]
    if gone and not prune:
        raise BadInputError(
            f"{len(gone)} image(s) of the store {store.path} are no longer in the data folder: "
            f"{short(gone)}",
            "put them back, or pass `prune=True` to keep them in the store as inactive (never "
            "trained on); add `compact=True` to also rewrite the store without them")
    inactive = (inactive | set(gone)) - set(folder_hashes)
    known = set(stored)
    new = [n for n in folder_hashes if n not in known]   # (a set made once: O(N), not O(N^2))
    hashes = dict(state.hashes)
    reextract, relabel, backfilled = [], [], []
    for i, name in enumerate(stored):
        if name not in folder_hashes:
            continue
        now, then = folder_hashes[name], state.hashes.get(name)
        if then is None:
            # A store written before hashes were recorded: nothing to compare with.
            backfilled.append(name)
        elif now[0] != then[0]:
            reextract.append(i)
        elif now[1] != then[1]:
            relabel.append(i)
        hashes[name] = list(now)
    for name in new:
        hashes[name] = list(folder_hashes[name])
    return Plan(names=tuple(stored + new), hashes=hashes,
                inactive=tuple(n for n in stored if n in inactive), new=tuple(new),
                reextract=tuple(reextract), relabel=tuple(relabel), pruned=tuple(gone),
                backfilled=tuple(backfilled))


def apply(store: FeatureStore, p: Plan, labels_by_name: dict, sizes: dict | None = None) -> None:
    """Carry out a plan on a store opened for writing (see the module docstring for why this
    order survives a kill). ``labels_by_name``: the folder's stored-form labels; ``sizes``:
    the folder's images' [H, W, resize mode] to record."""
    done = store.complete()
    index = {n: i for i, n in enumerate(store.names)}
    legacy = [n for n in p.backfilled if done[index[n]]]
    if legacy:
        log.warning("%s: %d extracted image(s) have no recorded content hash (a store from "
                    "before hashes): taking the folder's files as the ones extracted (%s)",
                    store.path, len(legacy), short(legacy))
    for i in p.reextract:
        if done[i]:
            store.mark_incomplete(i)
    for i in p.relabel:
        if done[i]:
            store.write_labels(i, labels_by_name[store.names[i]])
    n = len(p.names)
    store.resize(n)
    info = dataclasses.replace(store.info, num_images=n, names=p.names)
    recorded = read_state(store).sizes
    state = ImageState(p.hashes, p.inactive, {n: list((sizes or {}).get(n) or recorded[n])
                                               for n in p.names
                                               if n in (sizes or {}) or n in recorded})
    if info != store.info or state != read_state(store):  # a rerun with no change writes nothing
        write_state(store, info, state)
    if p.describe():
        log.info("%s follows the folder: %s", store.path, p.describe())


# -- compacting ------------------------------------------------------------------------------

def _compact_paths(path: str) -> tuple[Path, Path, Path]:
    """(store, new copy, old store) beside the folder a symlinked store path points to: the
    swap renames that folder, never the link."""
    p = Path(os.path.realpath(path))
    return p, p.with_name(p.name + ".compact"), p.with_name(p.name + ".old")


def finish_compact(path: str) -> None:
    """Complete (or undo) a compaction a kill interrupted. Safe to call always."""
    target, tmp, old = _compact_paths(path)
    if old.exists() and not target.exists() and tmp.exists():
        tmp.rename(target)  # killed between the two renames
    if old.exists() and target.exists():
        shutil.rmtree(old)
    if tmp.exists() and target.exists():
        shutil.rmtree(tmp)  # killed while copying: the original is intact


def compact(store: FeatureStore) -> FeatureStore:
    """Rewrite a local store without its inactive images (a new store beside it, copied image
    by image, then swapped in by two renames). Returns the new store, opened for writing."""
    if is_url(store.path):
        raise StoreError(f"`compact=True` needs a local store, not {store.path}",
                         "copy the store to a local path first")
    state = read_state(store)
    keep = [i for i, n in enumerate(store.names) if n not in set(state.inactive)]
    if len(keep) == len(store):
        return store
    done = store.complete()
    incomplete = [store.names[i] for i in keep if not done[i]]
    if incomplete:
        raise StoreError(f"{store.path}: cannot compact while {short(incomplete)} are not "
                         "completely extracted", "rerun extract without `compact=True` first")
    real, tmp, old = _compact_paths(store.path)
    if tmp.exists():
        shutil.rmtree(tmp)
    names = tuple(store.names[i] for i in keep)
    info = dataclasses.replace(store.info, num_images=len(keep), names=names)
    new = FeatureStore.create(tmp, info, config=store.config or None)
    new.plan_writes(range(len(keep)))   # whole shards, each written once
    for j, i in enumerate(keep):
        encoded = store.encode(i, store.maps(i))  # float16 and bfloat16 round-trip exactly
        new.write_image(j, encoded, store.labels(i) if info.has_labels else None, encoded=True)
    new.flush()
    write_state(new, info, ImageState({n: state.hashes[n] for n in names if n in state.hashes},
                                      sizes={n: state.sizes[n] for n in names
                                             if n in state.sizes}))
    real.rename(old)
    tmp.rename(real)
    shutil.rmtree(old)
    log.info("%s: compacted, %d inactive image(s) removed", store.path, len(store) - len(keep))
    return FeatureStore.open(store.path, mode="r+")
