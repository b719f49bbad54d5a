"""The distillation method: the four stages, the models with their capture hooks, the objective and its
training step."""
