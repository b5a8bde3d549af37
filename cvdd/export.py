"""A set exported for other tools: ``python -m cvdd.export set=<name> [dataset=… method=… …] --to <folder>``.

The set is named as ``relabel.py`` names it (the same overrides). The folder gets:

* ``images/<class index>_<class>/<ipc index>.png``: an ImageFolder whose class folders sort in the dataset's class
  order, as torchvision's ``ImageFolder`` and DD-Ranking's ``image_path`` read them;
* ``set.pt``: ``images`` (N, C, H, W) float32, class-major, normalised with the dataset's ``mean`` and ``std``
  (stored beside them), ``labels`` (N,) class indices, ``soft_labels`` (N, K): the logits of the set's labelling
  teachers at their voting weights on each whole image, BatchNorm in eval mode (DD-Ranking's soft-label mode
  ``S``: one static label per image; this framework's own labels are per epoch and crop), ``classes``,
  ``teachers``;
* ``README.md``: what each file holds and the DD-Ranking call that evaluates it.

The folder is written under a temporary name and renamed when complete; an existing one is refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from cvdd.artifacts.distilled import from_pixels, png_files, safe_name
from cvdd.config.compose import compose_stage
from cvdd.labels.bssl import soft_label_logits
from cvdd.labels.protocol import relabel_committee, teacher_weights
from cvdd.labels.student_set import StudentSet, student_set
from cvdd.runtime import log
from cvdd.runtime.errors import ConfigError, reported_errors

BATCH = 256


def export(cfg: DictConfig, to: Path, soft_labels: bool = True) -> Path:
    """Write the set ``cfg`` names to ``to`` (see the module docstring); returns ``to``."""
    to = Path(to)
    if to.exists():
        raise ConfigError(f"--to {to} exists; choose a new folder (an export is never written over)")
    root = Path(cfg.paths.artifacts)
    chosen = student_set(cfg, root)
    pixels = chosen.read().data
    if pixels.dtype != torch.uint8:
        raise ConfigError("export reads the set's PNGs: leave distilled.format=png")
    spec_mean, spec_std = chosen.mean, chosen.std
    images = from_pixels(pixels, spec_mean, spec_std)
    partial = to.parent / f".{to.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    write_image_folder(partial / "images", chosen)
    payload = {
        "images": images,
        "labels": chosen.labels.clone(),
        "mean": list(spec_mean),
        "std": list(spec_std),
        "classes": list(chosen.classes),
    }
    if soft_labels:
        weights = teacher_weights(cfg, root)
        payload["soft_labels"] = static_soft_labels(cfg, root, chosen, images, weights)
        payload["teachers"] = weights
    torch.save(payload, partial / "set.pt")
    (partial / "README.md").write_text(readme(cfg, chosen, payload))
    partial.rename(to)
    log.info("exported %s (%d images) to %s", chosen.name, len(chosen), to)
    return to


def write_image_folder(folder: Path, chosen: StudentSet) -> None:
    """The set's own PNG files, copied as ``<class index>_<class>/<ipc index>.png`` (index-prefixed, so the folders
    sort in class order): nothing is decoded or encoded again."""
    names = chosen.manifest.get("class_names") or chosen.classes
    width = max(len(str(len(chosen.classes) - 1)), 3)
    files, labels, ipc_index = png_files(chosen.manifest["files"])
    for name, label, i in zip(files, labels.tolist(), ipc_index.tolist(), strict=True):
        path = folder / f"{label:0{width}d}_{safe_name(str(names[label]))}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chosen.artifact.folder / name, path)


def static_soft_labels(
    cfg: DictConfig, root: Path, chosen: StudentSet, images: torch.Tensor, weights: dict[str, float]
) -> torch.Tensor:
    """``Σ_t w_t · logits_t`` of the labelling teachers on each whole image, BatchNorm in eval mode."""
    committee = relabel_committee(cfg, root, list(chosen.classes), weights)
    out = [
        soft_label_logits(committee.members, weights, images[i : i + BATCH], bssl=False, numerics=committee.numerics)
        for i in range(0, len(images), BATCH)
    ]
    return torch.cat(out).float().cpu()


def readme(cfg: DictConfig, chosen: StudentSet, payload: dict) -> str:
    counts = torch.bincount(chosen.labels, minlength=len(chosen.classes)).tolist()
    equal = len(set(counts)) == 1
    teachers = payload.get("teachers")
    rounded = {t: round(w, 4) for t, w in (teachers or {}).items()}
    lines = [
        f"# {chosen.name}: {cfg.dataset.name}, {len(chosen)} images, IPC {chosen.ipc} ({chosen.method})",
        "",
        "Exported by `python -m cvdd.export` from the cvdd set of this name.",
        "",
        "* `images/`: an ImageFolder, one folder per class, named `<class index>_<class>` so they sort in the",
        "  dataset's class order; PNG, the set's pixels exactly.",
        f"* `set.pt`: `images` ({', '.join(str(s) for s in payload['images'].shape)}) float32, class-major,",
        f"  normalised with mean {payload['mean']} and std {payload['std']} (also stored); `labels` class indices;",
        "  `classes` the class order"
        + (
            f"; `soft_labels` ({len(chosen)}, {len(chosen.classes)}): logits of {json.dumps(rounded)} (teacher:"
            " weight) on each whole image, BatchNorm in eval mode (DD-Ranking's soft-label mode `S`)."
            if teachers
            else "."
        ),
        "",
        "DD-Ranking (`pip install ddranking`; its config names the dataset, the model and the real data):",
        "",
        "```python",
        "import torch",
        "from ddranking.config import Config",
        "from ddranking.metrics import LabelRobustScoreSoft",
        "",
        'data = torch.load("set.pt")',
        f'metric = LabelRobustScoreSoft(Config.from_file("your_config.yaml"))  # soft_label_mode: S, ipc: {chosen.ipc}',
        'print(metric.compute_metrics(image_tensor=data["images"], soft_labels=data["soft_labels"], syn_lr=None))',
        "```",
        "",
        "DD-Ranking builds the hard labels itself as `ipc` images per class in class order, which is this file's order"
        + ("." if equal else f"; this set's classes hold {min(counts)} to {max(counts)} images, so it does not fit."),
        "`images` are normalised with the mean and std above; a tool that normalises its inputs itself wants the",
        "PNGs (or `images * std + mean`).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cvdd.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="the set as relabel.py names it: set=<name> dataset=… method=…")
    parser.add_argument("--to", type=Path, required=True, help="the folder to write (must not exist)")
    parser.add_argument("--no-soft-labels", action="store_true", help="leave the teachers' soft labels out")
    args = parser.parse_args(argv)
    with reported_errors():
        export(compose_stage("relabel", args.overrides), args.to, soft_labels=not args.no_soft_labels)


if __name__ == "__main__":
    main()
