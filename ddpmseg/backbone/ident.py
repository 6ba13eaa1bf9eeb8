"""``BackboneId``: what identifies the model that made a set of features.

It is the "fingerprint" of a feature store and of a run: the kind of backbone (ADM, or a
diffusers UNet2DModel / Stable Diffusion folder), the sha256 of its weights and its flags. This is the one place that reads or writes that JSON object, and the one place that
knows how a randomly initialised model (no checkpoint file) is named.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

# A random model has no file to hash: its "sha256" names the seed that built it.
RANDOM_PREFIX = "random-"
ADM = "adm"


@dataclass(frozen=True)
class BackboneId:
    sha256: str = ""
    flags: dict = field(default_factory=dict)   # ModelFlags.to_dict(), as JSON
    kind: str = ADM   # backbone kind; ADM ids carry no "kind" key, as format-1 stores wrote them

    def __post_init__(self):
        # Compare and store flags as JSON sees them (tuples and lists alike).
        object.__setattr__(self, "sha256", str(self.sha256 or ""))
        object.__setattr__(self, "flags", json.loads(json.dumps(dict(self.flags or {}))))
        object.__setattr__(self, "kind", str(self.kind or ADM))

    @classmethod
    def random(cls, seed: int, flags: Mapping | None = None) -> "BackboneId":
        return cls(f"{RANDOM_PREFIX}{int(seed)}", flags or {})

    @property
    def random_seed(self) -> int | None:
        """The seed of a ``Backbone.random`` model; None for a checkpoint."""
        if self.sha256.startswith(RANDOM_PREFIX):
            return int(self.sha256[len(RANDOM_PREFIX):])
        return None

    @classmethod
    def of(cls, backbone) -> "BackboneId":
        """The id of a backbone (anything with a ``fingerprint()`` dict)."""
        return cls.from_json(backbone.fingerprint())

    @classmethod
    def from_json(cls, raw: Mapping | None) -> "BackboneId":
        raw = raw or {}
        return cls(raw.get("sha256", ""), raw.get("flags") or {}, raw.get("kind", ADM))

    def to_json(self) -> dict:
        out = {"sha256": self.sha256, "flags": dict(self.flags)}
        if self.kind != ADM:
            out["kind"] = self.kind
        return out

    def differences(self, other: "BackboneId", here: str, there: str) -> list[str]:
        out = []
        if self.kind != other.kind:
            out.append(f"backbone kind ({self.kind} {here}, {other.kind} {there})")
        if self.sha256 != other.sha256:
            out.append(f"checkpoint sha256 ({self.sha256[:12]}... {here}, "
                       f"{other.sha256[:12]}... {there})")
        fa, fb = self.flags, other.flags
        keys = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
        if keys:
            out.append("model flags " + ", ".join(
                f"{k} ({fa.get(k)!r} {here}, {fb.get(k)!r} {there})" for k in keys[:6]))
        return out
