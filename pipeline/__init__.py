"""Floor 3: what the user touches (CLI, config, datasets, orchestration, demo data)."""

__version__ = "0.1.0"
