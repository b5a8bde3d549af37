"""CV-DD's recover settings (``method.recover.*``, conf/method/cvdd.yaml) as the method's constructor takes them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cvdd.committee.priors import MEMORY_KEYS
from cvdd.methods.init_images import INIT_MODES, PatchSettings
from cvdd.runtime.errors import ConfigError

KEY = "method.recover"


def optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class RecoverOptions:
    """The optimisation of a set's images: ``iterations`` of Adam at ``lr`` on CE + ``r_bn`` × the BN-statistics
    term (the first BN layer's × ``first_bn_multiplier``), ``class_block`` classes per unit, the augmentation
    (``crop_scale``, ``jitter``), the initialisation (``init``) and the memory layout (``grouping``, ``group_images``,
    ``wave_images``; results change by float rounding only) and ``snapshot_every`` (iterations between mid-wave
    snapshots; no effect on results). ``configured`` keeps the settings as given: the recipe
    fingerprints them as written, so a set made before this class existed is still recognised."""

    iterations: int
    lr: float
    r_bn: float
    first_bn_multiplier: float
    jitter: int
    class_block: int
    crop_scale: tuple[float, float]
    grouping: bool
    group_images: int | None
    wave_images: int | None
    keep_units: bool
    snapshot_every: int
    init: Mapping[str, Any]
    configured: Mapping[str, Any]

    @classmethod
    def parse(cls, node: Mapping[str, Any] | DictConfig) -> RecoverOptions:
        """``node`` (``method.recover``) as typed settings; :meth:`check` refuses bad values (the method checks them
        before anything is written: raised here, Hydra's ``instantiate`` would bury the message in its own error)."""
        given = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        return cls(
            iterations=int(given["iterations"]),
            lr=float(given["lr"]),
            r_bn=float(given["r_bn"]),
            first_bn_multiplier=float(given["first_bn_multiplier"]),
            jitter=int(given["jitter"]),
            class_block=int(given["class_block"]),
            crop_scale=tuple(given.get("crop_scale", (0.08, 1.0))),
            grouping=bool(given.get("grouping", True)),
            group_images=optional_int(given.get("group_images")),
            wave_images=optional_int(given.get("wave_images")),
            keep_units=bool(given.get("keep_units", True)),
            snapshot_every=int(given.get("snapshot_every", 0)),
            init=dict(given["init"]),
            configured=given,
        )

    def check(self) -> None:
        """Refuse a value that cannot work, naming its key."""
        if self.group_images is not None and self.group_images < 1:
            raise ConfigError(f"{KEY}.group_images={self.group_images} must be at least 1 (or null: from free memory)")
        if self.wave_images is not None and self.wave_images < (self.group_images or 1):
            raise ConfigError(
                f"{KEY}.wave_images={self.wave_images} is below "
                + (f"{KEY}.group_images={self.group_images}" if self.group_images else "one image")
                + ": a group is optimised at once; raise wave_images, or lower group_images (results change by "
                "float rounding only)"
            )
        if self.snapshot_every < 0:
            raise ConfigError(f"{KEY}.snapshot_every={self.snapshot_every} must be >= 0 iterations (0: no snapshots)")
        if self.init.get("mode") not in INIT_MODES:
            raise ConfigError(f"{KEY}.init.mode={self.init.get('mode')!r}; choose from {', '.join(INIT_MODES)}")

    @property
    def init_mode(self) -> str:
        return str(self.init["mode"])

    def patch_settings(self, ipc: int) -> PatchSettings | None:
        """The patch initialisation of a set of ``ipc`` images per class (``None`` unless ``init.mode=patches``);
        its own checks name ``method.recover.init.*``."""
        if self.init_mode != "patches":
            return None
        init = self.init
        return PatchSettings(
            int(ipc), str(init["difficulty"]), int(init["factor"]), int(init["candidates"]), tuple(init["scale"])
        )

    def recipe(self) -> dict[str, Any]:
        """The settings as configured, less those that change no result (memory, speed and disk)."""
        return {k: v for k, v in self.configured.items() if k not in MEMORY_KEYS}
