"""``ssl-container study``: pretrain a list of backbones (arms) under one DINO recipe, budget and set of
seeds, evaluate each with the project's own protocols, and report them side by side.

    ssl-container study --config configs/studies/imagenette.yaml [--arms a,b] [--seeds 0] [key=value ...]
    ssl-container study --config configs/studies/imagenet.yaml --slurm        (one Slurm job array)
    python -m study ...                                                     (the same)

An app beside ``eval/`` and ``launch/``: it builds on the library, the evaluations and the launcher,
and nothing below it imports it.

    config.py   the typed study config (arms, recipe, budget, seeds, evaluations)
    plan.py     units (arm x seed) as ordinary run folders, their trainer overrides and status
    runner.py   train (the trainer in its own process, resumable), evaluate, one result per unit
    report.py   study.json, study.md, study.png
    cli.py      the command line
"""
