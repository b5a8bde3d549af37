"""Squeeze: train one teacher. ``python train.py dataset=digits model=convnet`` (see conf/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

import cvdd.config.resolvers  # noqa: F401  (registers the ${dataset_spec:...} resolver)
from cvdd.config.migrations import refuse_old_spellings
from cvdd.runtime.distributed import isolated_job
from cvdd.runtime.errors import reported_errors
from cvdd.stages.squeeze import squeeze_teacher


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with isolated_job(), reported_errors():
        record = squeeze_teacher(cfg)
    return record.get("test_top1")


if __name__ == "__main__":
    refuse_old_spellings(sys.argv[1:])
    main()
