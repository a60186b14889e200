"""Training: the one loop (`trainer.py`), its settings, schedules and checkpoints."""
