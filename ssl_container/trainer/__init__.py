"""What trains: ``run`` (build_run: models, engine, teacher, loss, schedules, checkpoints; and
dino_step, one optimizer step), ``loop`` (train: the loop over dino_step), ``engine`` (DeepSpeed),
``checkpoint`` (atomic, verified checkpoints), ``resume`` (the resume plan: what a restart continues
and what it refuses), ``run_lock`` (one trainer per run folder), ``run_folder`` (the folder's layout,
which export and the launcher read too), ``metrics`` / ``trackers`` (metrics.jsonl, TensorBoard,
MLflow, W&B) and ``knn_monitor`` (the online k-NN during training). The command line is
``ssl_container.train``."""
