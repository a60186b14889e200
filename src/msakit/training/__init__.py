"""Training: the one loop (`trainer.py`), its settings and schedules, checkpoints, the run settings
(`config.py`), the run engine (`runs.py`: data preparation, seeds, resume, run folders) and training
on several processes under torchrun (`distributed.py`)."""
