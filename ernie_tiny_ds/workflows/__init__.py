"""Jobs built from stages: the pipeline, teacher finetuning, evaluation, speed measurement and the report."""
