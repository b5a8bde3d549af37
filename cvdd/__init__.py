"""cvdd: Committee Voting Dataset Distillation (CV-DD) and SRe2L++ on Hydra + PyTorch Lightning."""

__version__ = "0.1.0"
