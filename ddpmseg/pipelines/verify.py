"""``verify``: read every byte of a store or run and say what is damaged.

A store: its attributes and arrays' metadata (checked on open), every image's complete flag,
and every chunk of every complete image (checksum, presence, finite values). A run: its
manifest, header and every member (checksum against the manifest, loadable, finite weights).
Each problem is a ``Damage`` (what, where, detail); an empty list means sound.
``extract --repair`` re-extracts exactly the images a store's damage names. With a
``scheduler`` a store's images are read as dask tasks (the same list, in the same order); a
run's few members are read here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddpmseg.classifier.run import (
    CONFIG_FILE,
    MANIFEST_FILE,
    STORE_FILE,
    member_path,
    read_header,
    read_member,
)
from ddpmseg.core.errors import DdpmsegError, StoreAccessError
from ddpmseg.featcache.store import FeatureStore


@dataclass(frozen=True)
class Damage:
    what: str      # "image 3 (name)", "member_01.pt", "store", "run"
    where: str     # the array ("act_t50_b5", "labels", "complete") or file
    detail: str

    def __str__(self) -> str:
        return f"{self.what}\t{self.where}\t{self.detail}"


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / name).is_file() for name in
                              (CONFIG_FILE, STORE_FILE, MANIFEST_FILE))


def verify(path: str | Path, scheduler: str | None = None) -> tuple[str, list[Damage]]:
    """("store" or "run", damage found). A path that is neither, or a store whose metadata
    cannot be opened, is one Damage describing the error. ``scheduler``: "local",
    "local:N" or a dask scheduler address whose workers see the same files."""
    if scheduler:
        from ddpmseg.core.cluster import check_scheduler  # dask only when asked for
        check_scheduler(scheduler)
    if is_run_dir(path):
        return "run", verify_run(path)
    return "store", verify_store(path, scheduler)


def verify_store(path: str | Path, scheduler: str | None = None) -> list[Damage]:
    try:
        store = FeatureStore.open(path)
    except StoreAccessError:
        raise  # an object store not reached (credentials, endpoint, bucket): not damage
    except DdpmsegError as exc:
        return [Damage("store", str(path), str(exc))]
    bad_flags = set(store.damaged_flags())
    done = store.complete()
    # The complete images' chunks (the bulk of the bytes), here or as dask tasks.
    todo = [i for i in range(len(store)) if done[i] and i not in bad_flags]
    if scheduler:
        from ddpmseg.core.cluster import absolute
        from ddpmseg.pipelines import spread
        found = spread.in_order(scheduler, _damage_chunk, absolute(path), todo,
                                name="verify", doing=f"verifying {path}",
                                kept="nothing is written")
    else:
        found = (_image_damage(store, i) for i in todo)
    chunks = dict(zip(todo, found))
    out = []
    for i, name in enumerate(store.names):
        label = f"image {i} ({name})"
        if i in bad_flags:
            out.append(Damage(label, "complete", "the complete flag is damaged (the image "
                              "counts as incomplete and is re-extracted)"))
        elif not done[i]:
            out.append(Damage(label, "complete", "not extracted yet (incomplete)"))
        else:
            out.extend(chunks[i])
    return out


def _image_damage(store: FeatureStore, i: int) -> list[Damage]:
    label = f"image {i} ({store.names[i]})"
    return [Damage(label, array, what) for array, what in store.damage(i)]


def _damage_chunk(path: str, indices: list[int]) -> list[list[Damage]]:
    """A dask task: the damage of images ``indices`` of the store at ``path``."""
    from ddpmseg.core.cluster import opened, worker_must_see

    worker_must_see(path, "the feature store")
    store = opened(("verify", path), lambda: FeatureStore.open(path))
    return [_image_damage(store, i) for i in indices]


def verify_run(path: str | Path) -> list[Damage]:
    run_dir = Path(path)
    try:
        header = read_header(run_dir)
    except DdpmsegError as exc:
        return [Damage("run", str(run_dir), str(exc))]
    out = []
    count = header.config.classifier.ensemble
    for k in range(count):
        p = member_path(run_dir, k)
        if not p.is_file():
            out.append(Damage(p.name, str(p), "missing (not trained yet)"))
            continue
        try:
            saved = read_member(p)
            # Tensor methods: verify itself imports no torch (a store never needs it).
            bad = [key for key, v in saved["state_dict"].items()
                   if v.is_floating_point() and not bool(v.isfinite().all())]
        except DdpmsegError as exc:
            out.append(Damage(p.name, str(p), exc.message))
            continue
        except (KeyError, TypeError, AttributeError) as exc:
            out.append(Damage(p.name, str(p), f"not a member file ({exc})"))
            continue
        if bad:
            out.append(Damage(p.name, str(p), f"non-finite weights in {', '.join(bad[:3])}"))
    return out
