"""Model zoo: every network the committee, teachers and students are drawn from."""

from cvdd.models.registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
