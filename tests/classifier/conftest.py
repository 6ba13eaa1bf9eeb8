"""Small synthetic feature stores with separable classes, built in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpmseg.config import ClassifierConfig, Config
from ddpmseg.spec import FeatureSpec
from ddpmseg.featcache.store import FeatureStore, StoreInfo, parse_codec


def make_store(path, n_images: int = 4, size: int = 32, num_classes: int = 3, seed: int = 0,
               ignore_label: int = 255, fingerprint: dict | None = None,
               steps=(10, 20), labels: bool = True, complete: bool = True,
               codec: str | None = None) -> FeatureStore:
    """Two steps x two blocks: an 8x8 distractor map and a 16x16 map carrying the class.

    Labels are constant on 2x2-pixel cells (one cell of the 16x16 map each) and the 16x16 map
    holds 3 x one-hot(class) + noise, so a pixel's feature has its own class's channel largest
    (bilinear weights >= 0.5625 on its own cell): the classes are separable. About 1 cell in 8
    is the ignore label.
    """
    rng = np.random.default_rng(seed)
    cells = size // 2
    shapes = []
    for _ in steps:
        shapes += [(4, 8, 8), (num_classes + 2, cells, cells)]
    spec = FeatureSpec(steps=steps, blocks=(5, 8), shapes=shapes, image_size=(size, size),
                       backbone=fingerprint if fingerprint is not None else {"sha256": "f" * 64})
    info = StoreInfo(spec=spec, num_images=n_images,
                     names=tuple(f"img{i:03d}" for i in range(n_images)),
                     num_classes=num_classes, ignore_label=ignore_label,
                     class_names=tuple(f"c{i}" for i in range(num_classes)),
                     has_labels=labels, codec=parse_codec(codec))
    store = FeatureStore.create(path, info)
    for i in range(n_images if complete else n_images - 1):
        cls = rng.integers(0, num_classes, size=(cells, cells))
        one_hot = np.eye(num_classes, dtype=np.float32)[cls].transpose(2, 0, 1) * 3
        maps = []
        for _ in steps:
            maps.append(rng.normal(size=(4, 8, 8)).astype(np.float32))
            extra = rng.normal(size=(2, cells, cells)).astype(np.float32)
            maps.append(np.concatenate([one_hot + 0.1 * rng.normal(size=one_hot.shape), extra]))
        lab = None
        if labels:
            cell_lab = cls.astype(np.uint8)
            cell_lab[rng.random((cells, cells)) < 0.125] = ignore_label
            lab = np.kron(cell_lab, np.ones((2, 2), dtype=np.uint8))
        store.write_image(i, maps, lab)
    return store


def hand_etf(dim: int, num_classes: int, seed: int) -> np.ndarray:
    """The simplex ETF from its definition, in numpy float64: M = sqrt(C/(C-1)) U (I - 11^T/C),
    U the orthonormal columns of the QR of a (dim, C) Gaussian drawn by torch.Generator(seed)."""
    c = num_classes
    g = torch.randn(dim, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u, _ = np.linalg.qr(g.numpy())
    return np.sqrt(c / (c - 1)) * u @ (np.eye(c) - np.ones((c, c)) / c)


def hand_ce(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy from its definition: log-sum-exp of the logits minus the true one."""
    z = logits - logits.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


@pytest.fixture(scope="session", name="hand_etf")
def hand_etf_fixture():
    return hand_etf


@pytest.fixture(scope="session", name="hand_ce")
def hand_ce_fixture():
    return hand_ce


def small_config(**classifier) -> Config:
    base = dict(ensemble=2, max_epochs=4, min_epochs=1, patience=20, pixels_per_batch=64, seed=0)
    base.update(classifier)
    return Config(classifier=ClassifierConfig(**base))


@pytest.fixture(scope="session", name="make_store")
def make_store_fixture():
    return make_store


@pytest.fixture(scope="session", name="small_config")
def small_config_fixture():
    return small_config


@pytest.fixture(scope="session")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "small.zarr"
    make_store(path)
    return path
