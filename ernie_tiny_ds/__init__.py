"""ernie-tiny-ds: ERNIE-Tiny four-stage progressive distillation on DeepSpeed ZeRO."""

__version__ = "0.1.0"
