"""Recover: distill a dataset with a committee. ``python distill.py dataset=digits ipc=10 committee=small``."""

import sys

import hydra
from omegaconf import DictConfig

import cvdd.config.resolvers  # noqa: F401  (registers the config resolvers)
from cvdd.config.migrations import refuse_old_spellings
from cvdd.runtime.distributed import isolated_job
from cvdd.runtime.errors import reported_errors
from cvdd.stages.distill import distill


@hydra.main(version_base="1.3", config_path="conf", config_name="distill")
def main(cfg: DictConfig) -> None:
    with isolated_job(), reported_errors():
        distill(cfg)


if __name__ == "__main__":
    refuse_old_spellings(sys.argv[1:])
    main()
