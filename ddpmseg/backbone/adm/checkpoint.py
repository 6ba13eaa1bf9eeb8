"""Loading ADM checkpoints, and saying which flag is wrong when one does not fit.

A shape mismatch from ``load_state_dict`` lists hundreds of keys and names no cause; users of
these checkpoints nearly always got one flag wrong, so the error names the likely flags.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ddpmseg.core.errors import CheckpointError, InputNotFoundError

# Containers training scripts wrap a state dict in.
WRAPPER_KEYS = ("state_dict", "model", "ema", "model_state_dict", "ema_model")
# Prefixes DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") put on every key.
PREFIXES = ("module.", "_orig_mod.")
MAX_LISTED = 10


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    for _ in range(4):  # wrappers nest at most a couple of levels in practice
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    kind = type(obj).__name__
    keys = f" with keys {sorted(map(str, obj))[:MAX_LISTED]}" if isinstance(obj, Mapping) else ""
    raise CheckpointError(f"{source} holds no state dict (found a {kind}{keys})",
                          f"expected a dict of tensors, or one under "
                          f"{' / '.join(repr(k) for k in WRAPPER_KEYS)}")


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def load_state_dict(source: str | Path | Mapping) -> dict[str, torch.Tensor]:
    """A float32 CPU state dict from a checkpoint file (or an already loaded object).

    Accepts plain, wrapped ({"state_dict"|"model"|"ema": ...}) and "module."-prefixed state
    dicts in fp32, fp16 or bf16. Files are read with ``weights_only=True``: a checkpoint is
    never allowed to run code.
    """
    if isinstance(source, Mapping):
        obj, name = source, "state dict"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise InputNotFoundError(f"checkpoint {path} does not exist",
                                     "check the path to the .pt file")
        name = str(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile,
                ValueError) as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {_unreadable(path, exc)}",
                                  "it must be a torch.save'd state dict of tensors only") from exc
    sd = _strip_prefixes(_unwrap(obj, name))
    # Half-precision copies are cast up: features are computed in float32 regardless.
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def _unreadable(path: Path, exc: Exception) -> str:
    """Why torch.load failed, in our words: torch's own text for a refused unpickle is a
    paragraph about weights_only that suggests turning the safety off."""
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive (PK) or, in the legacy format, a pickle (0x80 protocol).
    if not (head == b"PK" or head[:1] == b"\x80"):
        return "not a PyTorch file (neither a zip archive nor a pickle)"
    if "weights_only" in str(exc).lower() or "Weights only" in str(exc):
        return "it holds Python objects other than tensors, which ddpmseg never unpickles"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def checkpoint_dtypes(path: str | Path) -> list[str]:
    """The floating dtypes of a checkpoint file's tensors as stored (e.g. ['float16']),
    memory-mapped where the file allows, so a large file is not read twice."""
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    sd = _unwrap(obj, str(path))
    return sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()
                   if torch.is_tensor(v) and v.is_floating_point()})


def _block_count(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    idx = [int(m.group(1)) for k in keys if (m := pat.match(k))]
    return max(idx) + 1 if idx else 0


def _suspect_flags(model_sd: Mapping[str, torch.Tensor], ckpt: Mapping[str, torch.Tensor],
                   missing: list[str], unexpected: list[str],
                   mismatched: list[str]) -> list[str]:
    """Human-readable guesses at which flags differ between the model and the checkpoint."""
    out: list[str] = []

    def shape(sd, key):
        return tuple(sd[key].shape) if key in sd else None

    m, c = shape(model_sd, "time_embed.0.weight"), shape(ckpt, "time_embed.0.weight")
    if m and c and m != c:
        out.append(f"num_channels (checkpoint has {c[1]}, flags give {m[1]})")
    nm, nc = _block_count(model_sd, "input_blocks"), _block_count(ckpt, "input_blocks")
    if nm != nc and nc:
        out.append(f"image_size / channel_mult / num_res_blocks (checkpoint has {nc} encoder "
                   f"blocks, flags give {nm})")
    m, c = shape(model_sd, "out.2.weight"), shape(ckpt, "out.2.weight")
    if m and c and m[0] != c[0]:
        out.append(f"learn_sigma (checkpoint has {c[0]} output channels, flags give {m[0]}; "
                   f"6 means learn_sigma true)")
    # The first ResBlock sits at full resolution whatever the other flags say, so its
    # emb_layers compare like with like; equal block widths rule out num_channels.
    emb, width = "input_blocks.1.0.emb_layers.1.weight", "input_blocks.1.0.out_layers.0.weight"
    m, c = shape(model_sd, emb), shape(ckpt, emb)
    if m and c and shape(model_sd, width) == shape(ckpt, width) and m[0] != c[0]:
        out.append(f"use_scale_shift_norm (the checkpoint {'uses' if c[0] > m[0] else 'does not use'}"
                   f" it: its emb_layers are {c[0]} wide for {shape(ckpt, width)[0]} channels)")
    changed = missing + unexpected
    if "label_emb.weight" in changed:
        out.append("class_cond (label_emb is in only one of checkpoint and model)")
    if nm == nc:
        # With equal block counts keys line up, so a key present on one side only is telling.
        if any(re.search(r"\.(qkv|proj_out|norm)\.", k) for k in changed):
            out.append("attention_resolutions (attention layers where the other has none)")
        # A resampling conv on one side where the other has a ResBlock at the same place.
        resampled = [m.group(1) for k in changed
                     if (m := re.match(r"(.*)\.(op|conv)\.weight$", k))]
        if any(f"{p}.in_layers.2.weight" in model_sd or f"{p}.in_layers.2.weight" in ckpt
               for p in resampled):
            out.append("resblock_updown (up/downsampling by ResBlocks vs by plain convs)")
    if not out and mismatched:
        out.append("channel_mult / num_channels (layer widths differ)")
    if not out:
        out.append("num_res_blocks / channel_mult / attention_resolutions")
    return out


def _listing(title: str, items: list[str]) -> str:
    more = f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return f"{len(items)} {title}: {', '.join(items[:MAX_LISTED])}{more}"


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint"
                     ) -> None:
    """Raise CheckpointError unless ``sd`` has exactly the model's keys and shapes."""
    model_sd = model.state_dict()
    missing = [k for k in model_sd if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    mismatched = [k for k in model_sd if k in sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(_listing("missing keys", missing))
    if unexpected:
        parts.append(_listing("unexpected keys", unexpected))
    if mismatched:
        parts.append(_listing("shape mismatches", [
            f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(model_sd[k].shape)})"
            for k in mismatched]))
    suspects = _suspect_flags(model_sd, sd, missing, unexpected, mismatched)
    note = ("num_heads / num_head_channels change no shapes, so they cannot be checked here; "
            "if a checkpoint loads but its features look wrong, check those")
    raise CheckpointError(
        f"{source} does not fit the model its flags describe: " + "; ".join(parts),
        (f"check the model flags, most likely {'; '.join(suspects)}" if suspects
         else "check the model flags against the ones the checkpoint was trained with")
        + f" ({note})")


def load_checkpoint(model: nn.Module, source: str | Path | Mapping) -> nn.Module:
    """Load a checkpoint strictly into ``model`` (in place) and return it.

    The model may live on the meta device: parameters are then replaced by the loaded tensors
    instead of copied into, which avoids initialising weights that are about to be overwritten.
    """
    sd = load_state_dict(source)
    check_state_dict(model, sd, source if isinstance(source, (str, Path)) else "state dict")
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(sd, strict=True, assign=on_meta)
    return model
