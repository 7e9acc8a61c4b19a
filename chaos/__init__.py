"""The chaos soak (``python -m chaos``): random fault schedules against the repair's invariants."""
