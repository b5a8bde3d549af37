"""Every artifact's name, folder and manifest, one module per kind, and how they are written and checked.

Everything lives under ``<paths.artifacts>/<dataset>/``:

* :mod:`~cvdd.artifacts.teacher`: ``teachers/<model>.{ckpt,json}``
* :mod:`~cvdd.artifacts.distilled`: ``distilled/<set>/`` (images, PNGs, grid, manifest)
* :mod:`~cvdd.artifacts.labels`: ``labels/<set>[_float][_top<k>]/`` (one soft-label file per epoch)
* :mod:`~cvdd.artifacts.results`: ``results/<set>__<student>__<labels>__<method>__<recipe>.json``
* :mod:`~cvdd.artifacts.patches`: ``patches/<identity>.pt`` (scored candidate crops)
* :mod:`~cvdd.artifacts.priors`: ``priors/<committee>_ipc<n>_s<seed>.json`` (measured committee priors)

:mod:`~cvdd.artifacts.identity` derives what names them (the dataset's identity, a set's name);
:mod:`~cvdd.artifacts.io` writes atomically and checks files against their manifests.
"""

from cvdd.artifacts.io import (
    ArtifactConflictError,
    ArtifactCorruptError,
    ArtifactNotWritableError,
    NamedArtifact,
    atomic_write,
    check_files,
    damaged_files,
    ensure_writable,
    file_digest,
    fingerprint,
    load_json,
    load_json_if_intact,
    load_tensors,
    save_json,
    save_tensors,
)
from cvdd.artifacts.teacher import TeacherArtifact

__all__ = [
    "ArtifactConflictError",
    "ArtifactCorruptError",
    "ArtifactNotWritableError",
    "NamedArtifact",
    "TeacherArtifact",
    "atomic_write",
    "check_files",
    "damaged_files",
    "ensure_writable",
    "file_digest",
    "fingerprint",
    "load_json",
    "load_json_if_intact",
    "load_tensors",
    "save_json",
    "save_tensors",
]
