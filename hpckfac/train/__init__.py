"""The training front end: ``hpckfac train`` (``cli``), its loop, data, schedule,
checkpoints and plots. See docs/training.md."""
