"""Data for distillation: the general corpus (stages 1-2) and task data (stages 3-4)."""
