"""A student that fits the rows it was trained on and not the task: its dev score alone cannot say so.

On `coherence` (BENCHMARKS 2) a student given four times the stage-4 steps classified training rows
better than the teacher (0.97 against 0.935) and dev rows at chance (0.33): it memorised the 4,962
rows. Its report said "keeps 58%", the same as a student that had not trained long enough, whose fix
is the opposite (more steps). Scoring both models on some training rows as well tells the two apart:
the share of the teacher's score the student keeps there, against the share it keeps on dev.
"""
from __future__ import annotations

KEY = "memorisation"  # the report entry that carries the diagnosis (absent when there is none)
TRAINING_ROWS = 512   # rows of the train split (an even stride over it) that both models are scored on
# a student that keeps this much more of the teacher's score on training rows than on dev fits rows, not
# the task; healthy students here keep about the same share on both (within a few points)
GAP = 0.10
LIKELY_FIXES = ("more steps will not help; likely fixes: a longer general stage on more text "
                "(stages.general.train.max_steps, data.corpus), more task data (ernie-tiny-ds augment), "
                "or a larger student")


def memorisation(metric: str, rows: int, teacher_train: float, student_train: float, teacher_dev: float,
                 student_dev: float) -> str | None:
    """One line when the student keeps GAP or more of the teacher's score on training rows than on dev."""
    scores = (teacher_train, student_train, teacher_dev, student_dev)
    if any(score is None for score in scores) or teacher_train <= 0 or teacher_dev <= 0:
        return None  # an undefined score, or a share of one at or below zero (a correlation), means nothing
    on_train, on_dev = student_train / teacher_train, student_dev / teacher_dev
    if on_train - on_dev < GAP:
        return None
    return (f"memorisation: the student keeps {on_train:.0%} of the teacher's {metric} on {rows} training rows "
            f"({student_train:.4g} vs {teacher_train:.4g}) but {on_dev:.0%} on dev ({student_dev:.4g} vs "
            f"{teacher_dev:.4g}): it fits the rows it was trained on, not the task; {LIKELY_FIXES}")
