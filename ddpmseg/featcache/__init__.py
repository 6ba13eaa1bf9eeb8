"""The feature cache: diffusion features of a folder of images in an on-disk Zarr store.

``extract(data_dir, store_path, config, checkpoint)`` writes a store; ``FeatureStore.open(path)``
reads one (native maps per image, labels, on-demand pixel features, lazy dask arrays).
The on-disk format is described in FORMAT.md beside this file.
"""

from .extraction import extract
from .store import FeatureStore, StoreInfo

__all__ = ["extract", "FeatureStore", "StoreInfo"]
