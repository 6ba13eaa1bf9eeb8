"""Checks that a store's bytes say what the store was made to say.

Chunks carry crc32c checksums (store.py); this module covers the rest of what can lie:

- the group attributes (StoreInfo and config) carry a sha256 digest of their canonical JSON,
  so a flipped bit that still parses (a changed image name, class name or checkpoint hash) is
  an error instead of a silently different store;
- every array's metadata (dtype and endianness, shape, chunks, codecs, fill value, dimension
  names, attributes) must equal what ``store.array_specs`` makes for the store's info: an
  ``"endian": "big"`` that passes the chunk checksums would otherwise read wrong numbers;
- a folder that is recognisably a partial or damaged store (only zarr temporary files, or only
  the entries a store has) may be replaced by ``--overwrite``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import zarr
from zarr.storage import MemoryStore

from ddpmseg.core.errors import StoreError
from ddpmseg.core.fileio import json_sha256
from ddpmseg.featcache.zarr_adapter import PARTIAL_FILE

DIGEST_KEY = "ddpmseg_digest"
# The entries of a store folder (zarr.json, the arrays' folders, zarr's temporary files).
_STORE_ENTRY = re.compile(
    r"^(zarr\.json|act_t\d+_b[\w.]+|labels|writer|image_records|complete)$")
_DAMAGED_HINT = "the store is damaged; re-extract it with the same command plus `overwrite=True`"


def attrs_digest(attrs: dict) -> str:
    """sha256 of the attributes (without the digest itself), as canonical JSON."""
    return json_sha256({k: v for k, v in attrs.items() if k != DIGEST_KEY})


def check_attrs(attrs: dict, path: str) -> None:
    """Raise StoreError when the group attributes do not match their digest. Stores written
    before the digest existed have none and are not checked."""
    stored = attrs.get(DIGEST_KEY)
    if stored is None:
        return
    if stored != attrs_digest(attrs):
        raise StoreError(f"{_file(path)}: the store's attributes do not match their checksum "
                         "(the file was changed or damaged)", _DAMAGED_HINT)


def _file(path: str, *parts: str) -> str:
    return "/".join([str(path).rstrip("/"), *parts, "zarr.json"])


def expected_metadata(specs: Sequence[tuple[str, dict]]) -> dict[str, dict]:
    """What each array's metadata must be: the arrays made in memory from the same specs."""
    group = zarr.create_group(store=MemoryStore(), zarr_format=3)
    return {name: group.create_array(name, **kw).metadata.to_dict() for name, kw in specs}


def check_arrays(group: zarr.Group, specs: Sequence[tuple[str, dict]],
                 path: str) -> dict[str, zarr.Array]:
    """Open every array the specs name and check its metadata; returns the opened arrays
    (an absent array is left out: a writer killed while creating the store makes the rest).
    Unreadable or different metadata is a StoreError naming the array's zarr.json."""
    expected = expected_metadata(specs)
    arrays = {}
    for name, want in expected.items():
        try:
            arr = group[name]
        except KeyError:
            continue
        except Exception as exc:  # noqa: BLE001 - any parse failure is damaged metadata
            raise StoreError(f"{_file(path, name)} is unreadable ({type(exc).__name__}: "
                             f"{_first_line(exc)})", _DAMAGED_HINT) from exc
        if not isinstance(arr, zarr.Array):
            raise StoreError(f"{_file(path, name)} is not an array's metadata", _DAMAGED_HINT)
        got = arr.metadata.to_dict()
        if _growing(got, want):
            # Longer along the image axis than the attributes say: a store that grows was
            # stopped after resizing its arrays, before recording the new images. The
            # attributes are the truth; the rerun records them.
            got = {**got, "shape": want["shape"]}
        diffs = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        if diffs:
            raise StoreError(f"{_file(path, name)}: {', '.join(diffs)} differ from what the "
                             "store's attributes say (the metadata was changed or damaged)",
                             _DAMAGED_HINT)
        arrays[name] = arr
    return arrays


def _growing(got: dict, want: dict) -> bool:
    gs, ws = list(got.get("shape") or []), list(want.get("shape") or [])
    return len(gs) == len(ws) > 0 and gs[0] > ws[0] and gs[1:] == ws[1:]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def only_temporary_files(path: str | Path) -> bool:
    """Whether a folder holds nothing but zarr's temporary files (a writer killed while
    writing the store's first file); an empty folder counts."""
    root = Path(path)
    return all(p.is_dir() or PARTIAL_FILE.search(p.name) for p in root.rglob("*"))


def looks_like_store(path: str | Path) -> bool:
    """Whether a folder holds only what a feature store holds (its zarr.json, its arrays'
    folders, zarr's temporary files), so that replacing it loses nothing else."""
    root = Path(path)
    entries = list(root.iterdir())
    return all(_STORE_ENTRY.match(p.name) or PARTIAL_FILE.search(p.name) for p in entries)
