"""The feature cache: diffusion features of a folder of images in an on-disk Zarr store.

``FeatureStore.open(path)`` reads one (native maps per image, labels, on-demand pixel features,
lazy dask arrays); ``ddpmseg.pipelines.extract`` writes one. The on-disk format is described in
FORMAT.md beside this file.

    store      the store: its attributes (StoreInfo, digest, image state), arrays, reading
    codec      stored dtypes (numpy and torch types), zarr codecs, rounding, encoding maps
    content    which images a store holds, and how it follows a changing folder
    image_records  per-image records in an array (format 4 stores: names and image state)
    integrity  checks of the attributes' digest and the arrays' metadata
    pixels     pixel features from native maps (tensors)

Reading a store imports no torch: only pixels does, and codec's functions that make tensors.
"""

from ddpmseg.featcache.store import FeatureStore, StoreInfo

__all__ = ["FeatureStore", "StoreInfo"]
