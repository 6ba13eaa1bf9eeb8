"""A trained run directory, loaded for prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddpmseg.classifier.model import PixelMLP
from ddpmseg.classifier.run import RETRAIN, member_path, read_header, read_member, resolved_config
from ddpmseg.config import Config
from ddpmseg.core.device import resolve_device
from ddpmseg.core.errors import BadInputError, RunError
from ddpmseg.featcache.store import StoreInfo


class Ensemble:
    """The members of a run, in eval mode on one device.

    ``members``: list of PixelMLP; ``info``: StoreInfo of the training store (steps, blocks,
    shapes, image size, classes, fingerprint...); ``store_path``: where it was; ``config``: the
    run's resolved Config; ``metas``: each member file's meta.
    """

    def __init__(self, members: list, info: StoreInfo, config: Config | None = None,
                 run_dir: str | Path | None = None, device: torch.device | str = "cpu",
                 store_path: str = "", metas: list | None = None):
        self.device = torch.device(device)
        self.members = [m.to(self.device).eval() for m in members]
        self.info = info
        self.config = resolved_config(config or Config(), info)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.store_path = store_path
        self.metas = metas or []

    def __len__(self) -> int:
        return len(self.members)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def feature_dim(self) -> int:
        return self.info.feature_dim

    def _input(self, features) -> torch.Tensor:
        if isinstance(features, np.ndarray):
            features = torch.from_numpy(features)
        x = features.to(self.device, torch.float32)
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise BadInputError(f"features must be (n, {self.feature_dim}), got "
                                f"{tuple(x.shape)}", "give one row of the run's "
                                f"{self.feature_dim} features per pixel")
        return x

    @torch.no_grad()
    def logits(self, features) -> list[torch.Tensor]:
        """Per-member logits: K float32 tensors (n, C) on the ensemble's device."""
        x = self._input(features)
        return [m(x) for m in self.members]

    @torch.no_grad()
    def probs(self, features) -> list[torch.Tensor]:
        """Per-member softmax probabilities: K float32 tensors (n, C) on the device."""
        return [torch.softmax(z, dim=1) for z in self.logits(features)]


def load_ensemble(run_dir: str | Path, device="auto") -> Ensemble:
    """Load a run directory written by ``fit``; every member of its config must be present."""
    run_dir = Path(run_dir)
    header = read_header(run_dir)
    info = header.info
    dev = resolve_device(device)
    k_total = header.config.classifier.ensemble
    missing = [k for k in range(k_total) if not member_path(run_dir, k).is_file()]
    if missing:
        raise RunError(f"{run_dir}: {len(missing)} of {k_total} members are not trained yet "
                       f"(e.g. {member_path(run_dir, missing[0]).name})",
                       "rerun the same fit to finish the run")
    members, metas = [], []
    for k in range(k_total):
        saved = read_member(member_path(run_dir, k))
        meta = saved.get("meta", {})
        model = PixelMLP(meta.get("dim", info.feature_dim),
                         meta.get("num_classes", info.num_classes), init=False)
        try:
            model.load_state_dict(saved["state_dict"])
        except (RuntimeError, KeyError) as exc:
            raise RunError(f"{member_path(run_dir, k)} does not fit the run's model "
                           f"({exc})", RETRAIN) from exc
        members.append(model.to(dev).eval())
        metas.append(meta)
    return Ensemble(members, info, header.config, run_dir, dev, header.store_path, metas)
