"""Checkpoint files of a backbone run, written so that a kill at any moment leaves a resumable
set.

The weights go to ``.model.pt.step<N>`` / ``.ema.pt.step<N>`` first; replacing state.pt (step
N) is the commit; the weight files are renamed into place after it, and a reader that finds
them still pending for its step finishes the renames (``roll_forward``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from PIL import Image

from ddpmseg.core.errors import RunError
from ddpmseg.core.fileio import atomic_write, remove_temporaries, write_json

STATE_VERSION = 1
WEIGHT_FILES = ("model.pt", "ema.pt")


def roll_forward(out: Path, step: int) -> None:
    """Put the weight files of committed ``step`` in place; drop those of uncommitted steps."""
    for name in WEIGHT_FILES:
        pending = out / f".{name}.step{step}"
        if pending.is_file():
            os.replace(pending, out / name)
        for stale in out.glob(f".{name}.step*"):
            stale.unlink(missing_ok=True)
    remove_temporaries(out)


def _cpu_state(sd: Mapping[str, torch.Tensor]) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def write_checkpoint(out: Path, step: int, model: torch.nn.Module, ema_model: torch.nn.Module,
                     flags_dict: dict, state: dict) -> None:
    """Weights, flags.json and state.pt of ``step`` (state.pt last: the commit point)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save(_cpu_state(model.state_dict()), out / f".model.pt.step{step}")
    torch.save(_cpu_state(ema_model.state_dict()), out / f".ema.pt.step{step}")
    write_json(out / "flags.json", {"model_flags": flags_dict})
    record = {"version": STATE_VERSION, "step": step, **state}
    atomic_write(out / "state.pt", lambda p: torch.save(record, p))
    roll_forward(out, step)


def read_state(out: Path) -> dict:
    """state.pt of the run in ``out`` (RunError when unreadable)."""
    try:
        return torch.load(out / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise RunError(f"cannot resume from {out}: {exc}",
                       "start a new output folder (the files are incomplete)") from exc


def read_weights(out: Path) -> tuple[dict, dict]:
    """(model, ema) state dicts of the run in ``out``, once ``roll_forward`` has run."""
    try:
        return (torch.load(out / "model.pt", map_location="cpu", weights_only=True),
                torch.load(out / "ema.pt", map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, EOFError) as exc:
        raise RunError(f"cannot resume from {out}: {exc}",
                       "start a new output folder (the files are incomplete)") from exc


def write_samples(out: Path, grid) -> None:
    """samples.png from a uint8 (H, W, 3) grid, atomically."""
    atomic_write(out / "samples.png", lambda p: Image.fromarray(grid).save(p, format="PNG"))


def trim_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the last save of a run that was killed)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    text = "\n".join(keep) + "\n" if keep else ""
    atomic_write(path, lambda p: p.write_text(text))
