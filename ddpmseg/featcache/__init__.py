"""The feature cache: diffusion features of a folder of images in an on-disk Zarr store.

``FeatureStore.open(path)`` reads one (native maps per image, labels, on-demand pixel features,
lazy dask arrays); ``ddpmseg.pipelines.extract`` writes one. The on-disk format is described in
FORMAT.md beside this file.
"""

from ddpmseg.featcache.store import FeatureStore, StoreInfo

__all__ = ["FeatureStore", "StoreInfo"]
