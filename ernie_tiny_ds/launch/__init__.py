"""Starting jobs on many ranks and nodes: the deepspeed runner with hostfiles, and Slurm."""
