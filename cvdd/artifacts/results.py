"""Student results: ``results/<set>__<student>__<labels>__<method>__<recipe>.json``, one file per recipe.

Runs that differ in any training or label setting get their own file; a rerun of the same recipe replaces its
own. ``python -m cvdd.report`` reads every result below a folder.
"""

from __future__ import annotations

from pathlib import Path


def results_folder(root: Path, dataset: str) -> Path:
    return Path(root) / dataset / "results"


def result_path(
    root: Path, dataset: str, set_name: str, student: str, labels: str, method: str, recipe_hash: str
) -> Path:
    return results_folder(root, dataset) / f"{set_name}__{student}__{labels}__{method}__{recipe_hash[:8]}.json"
