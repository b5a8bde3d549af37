"""Relabel: soft labels for a distilled set. ``python relabel.py dataset=digits ipc=10`` (see conf/relabel.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

import cvdd.config.resolvers  # noqa: F401  (registers the config resolvers)
from cvdd.config.migrations import refuse_old_spellings
from cvdd.runtime.distributed import isolated_job
from cvdd.runtime.errors import reported_errors
from cvdd.stages.relabel import relabel


@hydra.main(version_base="1.3", config_path="conf", config_name="relabel")
def main(cfg: DictConfig) -> None:
    with isolated_job(), reported_errors():
        relabel(cfg)


if __name__ == "__main__":
    refuse_old_spellings(sys.argv[1:])
    main()
