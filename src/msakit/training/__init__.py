"""Training: the one loop (`trainer.py`), its settings and schedules, checkpoints, the run settings
(`config.py`) and the run engine (`runs.py`: data preparation, seeds, resume, run folders)."""
