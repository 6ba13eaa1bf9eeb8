"""How a store holds values: the stored dtypes' numpy and torch types, the zarr codecs, lossy
mantissa rounding, and the encoding of an image's maps (cast, rounded, checked).

The dtypes' names (and mantissa bits, widths) are ``ddpmseg.spec``'s; their numpy types are
``ZARR_DTYPES`` and their torch types ``torch_dtype`` here, the one place each. Importing this
module imports no torch: only encoding (which makes tensors) does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from ddpmseg.core.errors import ConfigError, FeatureOverflowError, StoreError
from ddpmseg.spec import MANTISSA_BITS, STORE_DTYPES, FeatureSpec, rounding_name

# zarr has no bfloat16 dtype: bfloat16 values are stored as their uint16 bit patterns (the upper
# half of the float32 word) and readers widen them back to float32.
ZARR_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
BFLOAT16_ENCODING = "bfloat16 stored as uint16 bit patterns; float32 = (uint32(v) << 16)"
FLOAT16_MAX = float(np.finfo(np.float16).max)

# The default codec, chosen by bench/store_codec.py on real activations of the trained faces64
# backbone (ffhq_34 images at 64px, float16; bench/results/store_codec.json). Diffusion
# activations are noisy and float16 compresses little whatever the codec: Blosc Zstd level 1
# with bit shuffle saves 14% (ratio 1.16) at ~75 MB/s per thread, while the best ratio found
# (Zstd 9, byte shuffle: 1.23) writes at ~8 MB/s and Zstd 5 with bit shuffle (1.20) at half
# the speed of level 1. Without bit shuffle Zstd 1 gains only 1.09-1.10; LZ4 gains 1.00-1.04
# with byte or no shuffle and 1.14 with bit shuffle, at no better speed than Zstd 1 here; no
# codec at all writes ~110 MB/s. Reading is ~200-250 MB/s for every Blosc setting. Zstd 1 +
# bit shuffle is the best size per unit of write time, and writing runs in a thread pool
# beside the model. (bfloat16 activations compress to 1.50 with the same codec.)
DEFAULT_CODEC = {"cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"}


def torch_dtype(name: str):
    """The torch dtype of a stored dtype's name (one of ``spec.STORE_DTYPES``)."""
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16,
            "float32": torch.float32}[name]


def zarr_codecs(codec: dict) -> list:
    """The zarr codecs of a ``StoreInfo.codec`` setting: Blosc (unless "none"), then crc32c
    last: every chunk carries a checksum, so a flipped bit is an error, not a wrong value."""
    if codec.get("cname", "zstd") == "none":
        return [Crc32cCodec()]
    shuffle = BloscShuffle[codec.get("shuffle", "bitshuffle")]
    blosc = BloscCodec(cname=codec.get("cname", "zstd"), clevel=codec.get("clevel", 1),
                       shuffle=shuffle)
    return [blosc, Crc32cCodec()]


def parse_codec(name: str | None, dtype: str = "float16") -> dict:
    """The codec setting a ``codec`` name stands for, as ``StoreInfo.codec`` holds it.

    "lossless" (or None): the default Blosc setting. "bitroundK": the same, after rounding each
    value to K mantissa bits (round to nearest, ties to even), 1 <= K < the dtype's mantissa
    bits; relative error <= 2**-(K+1). Zeroed low bits compress well under bit shuffle, and a
    reader needs nothing to undo: the values are ordinary numbers of the store dtype.
    """
    codec = dict(DEFAULT_CODEC)
    if name in (None, "", "lossless"):
        return codec
    m = re.fullmatch(r"bitround(\d+)", str(name))
    top = MANTISSA_BITS.get(dtype, 0)
    if m is None or not 1 <= int(m.group(1)) < top:
        raise ConfigError(f"unknown codec {name!r} for dtype {dtype}",
                          f"use lossless or bitroundK with K in 1..{top - 1} (mantissa bits "
                          f"kept; see the store-size table in the README)")
    codec["keepbits"] = int(m.group(1))
    return codec


def codec_name(codec: dict) -> str:
    """The ``codec`` name of a ``StoreInfo.codec`` setting (inverse of ``parse_codec``)."""
    return rounding_name(codec.get("keepbits"))


def round_mantissa(t, keepbits: int):
    """``t`` (a float16, bfloat16 or float32 tensor) with its mantissa rounded to ``keepbits``
    bits.

    Round to nearest, ties to even, on the bit pattern: adding half a quantum (minus one, plus
    the kept LSB) then masking carries into the exponent when the mantissa overflows, so the
    result is the nearest value with ``keepbits`` bits (inf when that is beyond the dtype's
    largest finite value, which the caller's finiteness check turns into an error). NaN and
    inf are left as they are, for the same check.
    """
    import torch

    drop = MANTISSA_BITS[str(t.dtype).removeprefix("torch.")] - int(keepbits)
    if drop <= 0:
        return t
    width = 8 * t.element_size()
    as_int = torch.int16 if width == 16 else torch.int32   # the same bits, as an integer
    # int64 arithmetic on the unsigned pattern: no wrap-around for any width.
    bits = t.contiguous().view(as_int).to(torch.int64) & ((1 << width) - 1)
    bits = (bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)) & ~((1 << drop) - 1)
    bits = torch.where(bits >= 1 << (width - 1), bits - (1 << width), bits)
    rounded = bits.to(as_int).view(t.dtype)
    return torch.where(torch.isfinite(t), rounded, t)


def encode_map(m, dtype: str, what: str = "activation", keepbits: int | None = None
               ) -> np.ndarray:
    """One activation (tensor or array, any float dtype) as the store holds it.

    float16 values beyond +-65504 raise ``FeatureOverflowError`` (never a silent inf), and so
    does a map that is not finite to begin with. bfloat16 comes back as uint16 bit patterns.
    ``keepbits``: round the stored values to that many mantissa bits (lossy; ``parse_codec``).
    """
    import torch

    if dtype not in STORE_DTYPES:
        raise ConfigError(f"unknown store dtype {dtype!r}", f"use one of {', '.join(STORE_DTYPES)}")
    t = m.detach() if isinstance(m, torch.Tensor) else torch.from_numpy(np.asarray(m))
    if keepbits is not None:
        t = round_mantissa(t.to(torch_dtype(dtype)), keepbits)
    out = t.to(torch_dtype(dtype))
    if not bool(torch.isfinite(out).all()):
        _raise_not_finite(t, what, dtype)
    if dtype == "bfloat16":
        return out.view(torch.int16).cpu().numpy().view(np.uint16)
    return out.cpu().numpy()


def _raise_not_finite(t, what: str, dtype: str):
    import torch

    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise FeatureOverflowError(
            f"{what} has NaN or infinite values: the model's output is not finite",
            "check the checkpoint, and use `precision=fp32` if it ran in fp16")
    peak = float(t.abs().max())
    raise FeatureOverflowError(
        f"{what} has values up to {peak:.4g}, beyond {dtype}'s range (+-{FLOAT16_MAX:g})",
        "extract with `dtype=bfloat16` (features.dtype: same range as float32, half the "
        "bytes) or `dtype=float32`")


def encode_image(maps: Sequence, spec: FeatureSpec, image: str) -> list[np.ndarray]:
    """One image's maps (feature order) as a store of ``spec`` holds them, rounded as the spec
    says (``spec.keepbits``); ``image`` names it in errors (a wrong count or shape is a
    StoreError, an overflow a FeatureOverflowError)."""
    if len(maps) != len(spec.keys):
        raise StoreError(f"{image}: {len(maps)} maps given, the features have "
                         f"{len(spec.keys)} (steps x blocks)")
    out = []
    for (t, b), shape, m in zip(spec.keys, spec.shapes, maps):
        if tuple(m.shape) != tuple(shape):
            raise StoreError(f"{image}: map t={t} b={b} has shape {tuple(m.shape)}, the "
                             f"features have {tuple(shape)}")
        out.append(encode_map(m, spec.dtype, f"{image} activation t={t} block={b}",
                              spec.keepbits))
    return out


def decode_map(a: np.ndarray, dtype: str) -> np.ndarray:
    """A stored chunk as readers see it: bfloat16 bit patterns widen to float32."""
    if dtype == "bfloat16":
        return (np.asarray(a).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a)
