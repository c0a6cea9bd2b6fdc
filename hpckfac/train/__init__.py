"""The training front end: ``hpckfac train`` (``cli``), its settings (``config``), loop,
data, schedule, checkpoints, atomic file writes (``files``) and plots. See docs/training.md."""
