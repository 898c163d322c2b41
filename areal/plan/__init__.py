"""Cluster planning: how to split GPUs between generation and training, and what staleness buys.

`python -m areal.plan recipe=... cluster.gpus=N cluster.gpu=h100` (areal/plan/__main__.py) builds a
workload from the recipe (areal/plan/models.py for the architecture), prices each phase on a device
profile (areal/plan/hardware.py, areal/plan/costs.py) and simulates runs that drive areal's own
admission control (areal/plan/simulate.py). `--profile` measures this machine (profile.py);
`--validate` checks predictions against short real runs here and against AReaL's published figures.
"""
