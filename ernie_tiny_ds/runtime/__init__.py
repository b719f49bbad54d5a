"""Running a stage on DeepSpeed: process group and engines, the training loop, checkpoints, stop requests,
metrics, rank registry, exports, durable files."""
