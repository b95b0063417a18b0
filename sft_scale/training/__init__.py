"""In the training processes: the model (model.py, attention.py, loss.py, tasks.py), the loop
(loop.py), evaluation during training (validation.py), checkpoints (checkpoint.py), preemption
(preemption.py), metrics, the accelerator (distributed.py), and the run directory with what serving
needs (rundir.py, serving.py). sft_scale/train.py puts them together."""
