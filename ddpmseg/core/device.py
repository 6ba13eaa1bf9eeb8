"""Choosing the torch device from a user's ``--device`` string, and the torch thread count."""

from __future__ import annotations

import contextlib
import os
import typing

from ddpmseg.core.errors import ConfigError

if typing.TYPE_CHECKING:
    import torch


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` are taken as is."""
    import torch  # here: the CLI's option parsing imports this module and must stay light

    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}", "use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available",
                          "use `device=cpu` (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r}", "use auto, cpu, cuda or cuda:N")
    return device


# torch intra-op threads per kind of work when neither --threads nor OMP_NUM_THREADS says:
# measured by bench/fit_speed.py (fit) on a 2-core machine; see set_threads.
DEFAULT_THREADS = {"fit": 1}


def set_threads(threads: int | None = None, work: str | None = None) -> int:
    """Set torch's intra-op thread count and return it.

    ``threads`` (``--threads``) wins; else OMP_NUM_THREADS when set (torch reads it at start);
    else the measured default for ``work`` (``DEFAULT_THREADS``); else torch's own default
    (one per core).
    """
    import torch

    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        try:
            threads = max(1, int(os.environ["OMP_NUM_THREADS"].split(",")[0]))
        except ValueError as exc:
            raise ConfigError(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']!r} is not a "
                              "number", "set it to a positive integer, or unset it") from exc
    elif work in DEFAULT_THREADS:
        threads = DEFAULT_THREADS[work]
    else:
        return torch.get_num_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def use_threads(threads: int | None = None, work: str | None = None):
    """``set_threads(threads, work)`` for the length of a ``with`` block, then torch's thread
    count as it was: the library's commands take ``threads=`` and leave the caller's setting
    alone."""
    import torch

    before = torch.get_num_threads()
    set_threads(threads, work)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# /proc/cpuinfo flags of CPUs that compute bfloat16 natively (AMX tiles, or AVX-512 BF16
# dot products). Without them torch emulates bf16 with float32 arithmetic plus conversions.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags from ``cpuinfo`` (Linux), or None where it cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def cpu_bf16_native(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AMX-BF16 or AVX512-BF16).

    ``flags``: the CPU's feature flags (default: ``cpu_flags()``); where those cannot be read,
    torch's own probes of the same instructions answer.
    """
    if flags is None:
        flags = cpu_flags()
    if flags is not None:
        return bool(flags & NATIVE_BF16_FLAGS)
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
