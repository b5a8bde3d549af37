"""Validate: train a student on a distilled set. ``python evaluate.py dataset=digits ipc=10 student=convnet``."""

import sys

import hydra
from omegaconf import DictConfig

import cvdd.config.resolvers  # noqa: F401  (registers the config resolvers)
from cvdd.config.migrations import refuse_old_spellings
from cvdd.runtime.distributed import isolated_job
from cvdd.runtime.errors import reported_errors
from cvdd.stages.validate import validate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    with isolated_job(), reported_errors():
        result = validate(cfg)
    return result.get("test_top1")


if __name__ == "__main__":
    refuse_old_spellings(sys.argv[1:])
    main()
