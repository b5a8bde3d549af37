"""Stage jobs: config → objects → Trainer, shared by the entry points and by other stages."""
