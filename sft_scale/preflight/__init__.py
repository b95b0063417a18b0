"""Before any weights load: resolve what a run will do (resolve.py), its DeepSpeed JSON
(deepspeed.py), the launch line (command.py), SLURM jobs (slurm.py), the memory plan (plan.py) and
`sft-scale check` (check.py). Runs on a laptop or a login node in seconds, and at the start of
every training process."""
