"""Training: the one training loop (loop.py) and the pieces every trainer shares (schedules, optimizer,
balancing, checkpoints, metrics), with pretraining and SFT on them; the R1 stages are seekforge.rl. Import
submodules directly; this package imports nothing so that `seekforge` commands which do not train start fast."""
