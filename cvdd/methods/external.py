"""A set distilled elsewhere, brought in (``method=external``): the released sets of CV-DD, RDED, SRe2L and the rest
become sets of this framework, so relabel and validate run on them exactly as on a set made here.

Two sources (``method.source``):

* an **image folder**, one subfolder of JPEG/PNG files per class. Folders are matched to the dataset's classes by
  a class map (``method.class_map``: JSON ``{folder: class}`` or text lines ``folder class``), else by name (the
  dataset's class ids, e.g. WNIDs, or class names), else — numbered folders such as ``new000`` (CV-DD) or
  ``00000`` (RDED) — by number as the class index in the dataset's order, said in a warning. Within a folder the
  files are taken in name order.
* a **tensor file** (``torch.save`` of ``{"images": (N, C, H, W), "labels": (N,)}``): uint8 pixels, or floats with
  ``method.normalized=true`` (normalised with the dataset's mean and std) or ``false`` (pixels in [0, 1]); labels
  are class indices in the dataset's order (a class map may rename them: ``{"<index>": class}``). Soft labels per
  image (``soft_labels`` (N, K), or ``labels`` itself as (N, K): the class is the argmax), logits or probabilities,
  are kept beside the set for ``evaluate.py labels=static`` (DD-Ranking's mode ``S``, as ``cvdd.export`` writes
  them); relabel still makes this framework's own.

Images must have the dataset's size (``method.resize=true`` resizes them, PIL bilinear with antialiasing) and
channels (a grey image in a colour dataset is repeated; a colour image in a grey dataset is refused unless its
channels agree). Classes may hold different numbers of images (recorded). A class the source lacks is refused.

Before the set is published the pool's teachers classify every image: if they agree with the class order no
better than twice chance, or a permutation of the classes explains their predictions far better, the import stops
with the permutation's first differences, a suggested class map written beside the run, and ``method.force=true``
to import anyway. The manifest records where the images came from: the source path, every file's digest, how the
classes were matched and what the teachers made of them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment

from cvdd.artifacts import file_digest, fingerprint, save_json, save_tensors
from cvdd.artifacts.distilled import from_pixels, normalise
from cvdd.artifacts.identity import dataset_identity
from cvdd.committee.committee import Committee
from cvdd.data.images import eight_bit
from cvdd.methods.base import DistillContext
from cvdd.methods.per_class import PerClassMethod
from cvdd.runtime import log
from cvdd.runtime.distributed import rank_and_world
from cvdd.runtime.errors import ConfigError, DataError, MissingInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
GREY_TOLERANCE = 8  # largest channel spread (0-255) of an image that counts as grey (JPEG chroma rounding)
NUMBERED = re.compile(r"\D*(\d+)")
SHUFFLED_MARGIN = 0.2  # a permutation agreeing on this much more of the set than the given order: classes mixed up
VOTE_BATCH = 256


@dataclass(frozen=True)
class Source:
    """What the source holds for each class (files or tensor rows) and how its classes were matched."""

    kind: str  # folder | tensor
    path: Path
    members: dict[int, list[Any]]  # class index → its files (folder) or row indices (tensor), in order
    names: dict[int, str]  # class index → the folder (or label) it came from
    matched_by: str

    def listing(self) -> list:
        """What identifies the source's content cheaply (name, size, modification time of every file)."""
        files = [f for c in sorted(self.members) for f in self.members[c]] if self.kind == "folder" else [self.path]
        return [[str(f.relative_to(self.path) if self.kind == "folder" else f.name), *stat(f)] for f in files]


def stat(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


class ExternalSet(PerClassMethod):
    def __init__(
        self,
        name: str,
        set_name: str,
        labels_by: str,
        source: str | None = None,
        class_map: str | None = None,
        normalized: bool | None = None,
        resize: bool = False,
        force: bool = False,
    ):
        super().__init__(name, set_name, labels_by)
        self.source_path = None if source is None else Path(source).expanduser()
        self.class_map = None if class_map is None else Path(class_map).expanduser()
        self.normalized, self.resize, self.force = normalized, bool(resize), bool(force)
        self._source: Source | None = None
        self._tensors: dict[str, torch.Tensor] | None = None
        self._committee: Committee | None = None

    def check(self, ctx: DistillContext) -> None:
        self.source(ctx)

    def source(self, ctx: DistillContext) -> Source:
        """The source listed and its classes matched (once per run); every problem refused before any image is
        read."""
        if self._source is None:
            if self.source_path is None:
                raise ConfigError("method=external needs method.source=<folder of class folders, or a .pt file>")
            if not self.source_path.exists():
                raise MissingInputError(f"method.source={self.source_path} does not exist")
            classes, names = ctx.data.classes, ctx.data.class_names
            class_map = read_class_map(self.class_map) if self.class_map else None
            if self.source_path.is_dir():
                self._source = folder_source(self.source_path, classes, names, class_map)
            else:
                self._source = tensor_source(self.source_path, self.tensors(), classes, names, class_map)
            missing = [classes[c] for c in range(len(classes)) if not self._source.members.get(c)]
            if missing:
                raise DataError(
                    f"{self.source_path} has no images of {len(missing)} class(es) of {ctx.cfg.dataset.name}: "
                    f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}; a set needs every class"
                )
        return self._source

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            try:
                payload = torch.load(self.source_path, map_location="cpu", weights_only=True)
            except Exception as err:  # any unreadable file: pickle, zip or torch's own errors
                raise DataError(f"method.source={self.source_path} cannot be read as a tensor file ({err})") from err
            if not isinstance(payload, dict) or "images" not in payload or "labels" not in payload:
                raise DataError(
                    f"method.source={self.source_path} must hold a dict with 'images' (N, C, H, W) and 'labels' (N,)"
                )
            self._tensors = payload
        return self._tensors

    def recipe(self, ctx: DistillContext) -> dict[str, Any]:
        """The dataset, the source's content (every file's name, size and modification time), how its classes were
        matched, and the conversions; not where the source lives, nor the teachers (they only check it)."""
        source = self.source(ctx)
        return {
            "dataset": dataset_identity(ctx.cfg.dataset),
            "method": self.name,
            "source": fingerprint({"kind": source.kind, "files": source.listing()}),
            "classes": {source.names[c]: c for c in sorted(source.names)},
            "normalized": self.normalized,
            "resize": self.resize,
        }

    def prepare(self, ctx: DistillContext) -> None:
        self._committee = ctx.committee(list(ctx.cfg.committee.members))

    def make_class(self, ctx: DistillContext, c: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Class ``c``'s images, normalised, and its record: their digests and the pool's votes on them."""
        source, spec = self.source(ctx), ctx.spec
        if source.kind == "folder":
            files = source.members[c]
            pixels = torch.stack([read_image(f, spec.channels, spec.image_size, self.resize) for f in files])
            images = from_pixels(pixels, spec.mean, spec.std)
            digests = [[str(f.relative_to(source.path)), file_digest(f)["sha256"]] for f in files]
        else:
            images = self.tensor_images(source.members[c], ctx)
            digests = []
        votes = pool_votes(self._committee, images, len(ctx.data.classes))
        return images, {"files": digests, "votes": votes.tolist()}

    def tensor_images(self, rows: list[int], ctx: DistillContext) -> torch.Tensor:
        spec = ctx.spec
        images = self.tensors()["images"][rows]
        if images.dtype == torch.uint8:
            images = from_pixels(images, spec.mean, spec.std)
        elif self.normalized is None:
            raise ConfigError(
                f"{self.source_path} holds float images: say how they are scaled, method.normalized=true (normalised "
                f"with the dataset's mean {list(spec.mean)} and std {list(spec.std)}) or false (pixels in [0, 1])"
            )
        elif not self.normalized:
            images = normalise(images.float(), spec.mean, spec.std)
        return check_tensor_shape(images.float(), spec.channels, spec.image_size, self.resize, self.source_path)

    def metadata(self, ctx: DistillContext, records: list[dict[str, Any]]) -> dict[str, Any]:
        """The provenance, and the teachers' check of the class order (refused here, before the set is written)."""
        source, classes = self.source(ctx), ctx.data.classes
        confusion = np.array([r["votes"] for r in records])
        check = class_order_check(confusion)
        if not self.force:
            refuse_mixed_classes(check, source, classes, ctx.cfg.paths.output_dir)
        counts = [len(source.members[c]) for c in range(len(classes))]
        if len(set(counts)) > 1:
            log.warning("%s: classes hold %d to %d images (recorded per class)", source.path, min(counts), max(counts))
        return {
            "ipc": max(counts),
            "ipc_per_class": counts,
            **self.keep_soft_labels(ctx),
            "source": {
                "path": str(source.path.resolve()),
                "kind": source.kind,
                "classes_matched_by": source.matched_by,
                "class_of": {source.names[c]: classes[c] for c in sorted(source.names)},
                "files": {name: digest for r in records for name, digest in r["files"]}
                or {source.path.name: file_digest(source.path)["sha256"]},
                "resized": self.resize,
            },
            "import_check": {**check, "forced": self.force},
        }

    def keep_soft_labels(self, ctx: DistillContext) -> dict[str, Any]:
        """The source's soft labels, in the set's order and the dataset's class order, written beside the set (rank
        0) for ``evaluate.py labels=static``; the manifest field that records them (none: no field, no file)."""
        source, path = self.source(ctx), ctx.artifact.static_labels
        soft = None if source.kind != "tensor" else soft_labels_of(source.path, self.tensors(), len(ctx.data.classes))
        if soft is None or rank_and_world()[0] != 0:
            return {}
        rows = [r for c in sorted(source.members) for r in source.members[c]]
        columns = [int(source.names[c]) for c in range(len(ctx.data.classes))]  # dataset class c ← source label
        save_tensors(path, {"soft_labels": soft[rows][:, columns].contiguous()})
        log.info("%s: static soft labels of %d images kept for evaluate.py labels=static", source.path, len(rows))
        return {"static_soft_labels": {"file": path.name, **file_digest(path)}}


def folder_source(root: Path, classes: list[str], class_names: list[str], class_map: dict[str, str] | None) -> Source:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"method.source={root} holds no class folders (one subfolder of images per class)")
    index, matched_by = match_classes([f.name for f in folders], classes, class_names, class_map)
    members, names = {}, {}
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        members[index[folder.name]], names[index[folder.name]] = files, folder.name
    return Source("folder", root, members, names, matched_by)


def tensor_source(
    path: Path, payload: dict, classes: list[str], class_names: list[str], class_map: dict[str, str] | None
) -> Source:
    labels = hard_labels(path, payload)
    present = sorted({int(v) for v in labels.tolist()})
    if class_map:
        index, matched_by = match_classes([str(v) for v in present], classes, class_names, class_map)
    else:
        if present[0] < 0 or present[-1] >= len(classes):
            raise DataError(f"{path}: labels run from {present[0]} to {present[-1]}; {len(classes)} classes expected")
        index, matched_by = {str(v): v for v in present}, "labels are class indices in the dataset's order"
    members = {index[str(v)]: torch.nonzero(labels == v).flatten().tolist() for v in present}
    return Source("tensor", path, members, {index[str(v)]: str(v) for v in present}, matched_by)


def hard_labels(path: Path, payload: dict) -> torch.Tensor:
    """The class of every image: ``labels`` (N,) class indices, or the argmax of soft ``labels`` (N, K)."""
    labels = payload["labels"]
    if labels.dim() == 2 and labels.dtype.is_floating_point:
        labels = labels.argmax(1)
    elif labels.dim() != 1 or labels.dtype.is_floating_point:
        raise DataError(
            f"{path}: 'labels' must be one class index per image (N,) or soft labels (N, classes), not "
            f"{tuple(labels.shape)} {labels.dtype}"
        )
    if len(labels) != len(payload["images"]):
        raise DataError(f"{path}: {len(payload['images'])} images but {len(labels)} labels")
    return labels


def soft_labels_of(path: Path, payload: dict, num_classes: int) -> torch.Tensor | None:
    """The static soft labels a tensor file carries (``soft_labels`` (N, K), or ``labels`` when 2-D), as logits:
    rows that are probabilities (non-negative, summing to 1) are stored as their logarithm, so every temperature
    treats both alike. ``None`` when the file has only class indices."""
    soft = payload.get("soft_labels")
    if soft is None and payload["labels"].dim() == 2:
        soft = payload["labels"]
    if soft is None:
        return None
    if soft.shape != (len(payload["images"]), num_classes) or not soft.dtype.is_floating_point:
        raise DataError(
            f"{path}: soft labels must be floats of shape ({len(payload['images'])}, {num_classes}) (one row of "
            f"logits or probabilities per image, columns in the dataset's class order), not {tuple(soft.shape)}"
        )
    soft = soft.float()
    if not torch.isfinite(soft).all():
        raise DataError(f"{path}: the soft labels hold NaN or infinite values")
    if (soft >= 0).all() and torch.allclose(soft.sum(1), torch.ones(len(soft)), atol=1e-3):
        return soft.clamp_min(1e-12).log()
    return soft


def read_class_map(path: Path) -> dict[str, str]:
    """``{folder: class}`` from JSON, or from text lines ``folder class`` (``#`` comments)."""
    if not path.is_file():
        raise MissingInputError(f"method.class_map={path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"method.class_map={path} is not valid JSON ({err})") from err
        if not isinstance(mapping, dict):
            raise ConfigError(f"method.class_map={path} must be a JSON object {{folder: class}}")
        return {str(k): str(v) for k, v in mapping.items()}
    pairs = [line.split("#", 1)[0].split() for line in text.splitlines()]
    bad = [p for p in pairs if p and len(p) != 2]
    if bad:
        raise ConfigError(f"method.class_map={path}: every line is 'folder class'; found {' '.join(bad[0])!r}")
    return {p[0]: p[1] for p in pairs if p}


def match_classes(
    folders: list[str], classes: list[str], class_names: list[str], class_map: dict[str, str] | None
) -> tuple[dict[str, int], str]:
    """Each source folder's class index, and how they were matched."""
    by_id = {c.lower(): i for i, c in enumerate(classes)}
    by_name = {n.lower(): i for i, n in enumerate(class_names)}
    if class_map is not None:
        unmapped = [f for f in folders if f not in class_map]
        if unmapped:
            raise ConfigError(f"the class map has no entry for {', '.join(unmapped[:5])}: give every folder a class")
        index = {f: class_index(class_map[f], by_id, by_name, len(classes), f) for f in folders}
        matched_by = "class map"
    elif all(f.lower() in by_id for f in folders):
        index, matched_by = {f: by_id[f.lower()] for f in folders}, "folder names are the dataset's class ids"
    elif all(f.lower() in by_name for f in folders):
        index, matched_by = {f: by_name[f.lower()] for f in folders}, "folder names are the dataset's class names"
    elif all(NUMBERED.fullmatch(f) for f in folders):
        numbers = {f: int(NUMBERED.fullmatch(f).group(1)) for f in folders}
        if max(numbers.values()) >= len(classes):
            raise ConfigError(
                f"numbered class folders run up to {max(numbers.values())}, beyond the dataset's {len(classes)} "
                "classes; pass method.class_map=<file> ({folder: class})"
            )
        index, matched_by = numbers, "folder number = class index in the dataset's order (numbered folders)"
        log.warning(
            "class folders %s… are numbered: folder number n is taken as class n of the dataset's order (%s…). "
            "If the set was made with another order, pass method.class_map=<file>; the teachers check it below",
            ", ".join(folders[:3]),
            ", ".join(classes[:3]),
        )
    else:
        unknown = [f for f in folders if f.lower() not in by_id and f.lower() not in by_name]
        raise ConfigError(
            f"class folders {', '.join(unknown[:5])} match no class of the dataset (ids {', '.join(classes[:3])}…, "
            f"names {', '.join(class_names[:3])}…); pass method.class_map=<file.json> ({{folder: class}})"
        )
    taken: dict[int, str] = {}
    for folder, c in index.items():
        if c in taken:
            raise ConfigError(f"folders {taken[c]} and {folder} both map to class {classes[c]}")
        taken[c] = folder
    return index, matched_by


def class_index(value: str, by_id: dict[str, int], by_name: dict[str, int], num_classes: int, folder: str) -> int:
    key = value.lower()
    if key in by_id:
        return by_id[key]
    if key in by_name:
        return by_name[key]
    if key.isdigit() and int(key) < num_classes:
        return int(key)
    raise ConfigError(f"class map: {folder} -> {value!r} is no class id, name or index of the dataset")


def read_image(path: Path, channels: int, size: int, resize: bool) -> torch.Tensor:
    """One image as uint8 (C, H, W) in the dataset's channels and size (see the module docstring)."""
    try:
        with Image.open(path) as img:
            img.load()
            if (img.width, img.height) != (size, size):
                if not resize:
                    raise DataError(
                        f"{path} is {img.width}×{img.height} px; the dataset's images are {size}×{size}. Add "
                        f"method.resize=true to resize every image (PIL bilinear, antialiased)"
                    )
                img = img.resize((size, size), Image.BILINEAR)
            rgb = np.asarray(eight_bit(img, path).convert("RGB"))
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"{path} cannot be read as an image ({err}); replace or remove it") from err
    if channels == 1:
        spread = int((rgb.max(axis=2).astype(int) - rgb.min(axis=2)).max())
        if spread > GREY_TOLERANCE:
            raise DataError(f"{path} is a colour image (channels differ by up to {spread}); the dataset is grey")
        return torch.from_numpy(rgb[:, :, :1].copy()).permute(2, 0, 1)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def check_tensor_shape(images: torch.Tensor, channels: int, size: int, resize: bool, path: Path) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != channels:
        raise DataError(f"{path}: images are {tuple(images.shape)}; (N, {channels}, {size}, {size}) expected")
    if images.shape[-2:] != (size, size):
        if not resize:
            raise DataError(
                f"{path}: images are {images.shape[-1]}×{images.shape[-2]} px, the dataset's {size}×{size}; add "
                "method.resize=true (bilinear, antialiased)"
            )
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images


def pool_votes(committee: Committee, images: torch.Tensor, num_classes: int) -> torch.Tensor:
    """How many of ``images`` the pool (its members' summed softmax) puts in each class."""
    device = next(committee.parameters()).device
    votes = torch.zeros(num_classes, dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(images), VOTE_BATCH):
            x = images[start : start + VOTE_BATCH].to(device)
            probs = sum(
                committee.numerics[m].forward(net, x).float().softmax(dim=1) for m, net in committee.members.items()
            )
            votes += torch.bincount(probs.argmax(dim=1).cpu(), minlength=num_classes)
    return votes


def class_order_check(confusion: np.ndarray) -> dict[str, Any]:
    """The pool's top-1 on the classes as imported, and under the permutation of classes that agrees best with its
    predictions (``confusion[c, p]``: images of class ``c`` the pool puts in ``p``)."""
    total = confusion.sum()
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    return {
        "teacher_top1": 100 * float(np.trace(confusion)) / total,
        "best_permutation_top1": 100 * float(confusion[rows, cols].sum()) / total,
        "chance": 100 / len(confusion),
        "best_permutation": [int(c) for c in cols],
    }


def refuse_mixed_classes(check: dict[str, Any], source: Source, classes: list[str], output_dir: str) -> None:
    """Stop an import whose class order the teachers do not recognise (see the module docstring)."""
    top1, best, chance = check["teacher_top1"], check["best_permutation_top1"], check["chance"]
    if best - top1 <= 100 * SHUFFLED_MARGIN and top1 >= 2 * chance:
        return
    moved = [(c, p) for c, p in enumerate(check["best_permutation"]) if c != p]
    suggestion = {source.names[c]: classes[p] for c, p in enumerate(check["best_permutation"]) if c in source.names}
    suggested = save_json(Path(output_dir) / "suggested_class_map.json", suggestion)  # every rank: the same file
    lines = [f"  {source.names[c]} (imported as {classes[c]}) looks like {classes[p]}" for c, p in moved[:5]]
    raise DataError(
        f"the pool's teachers put {top1:.1f} % of {source.path} in its imported class (chance {chance:.1f} %); "
        f"with the classes permuted as their predictions suggest, {best:.1f} %. First differences:\n"
        + ("\n".join(lines) if lines else "  (none: the images look like no class)")
        + f"\nIf the classes are mixed up, pass a class map: method.class_map={suggested} (the suggested one; "
        f"check it), or a JSON {{folder: class}} of your own. To import as it is: method.force=true"
    )
