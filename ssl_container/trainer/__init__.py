"""What trains: ``run`` (build_run: models, engine, teacher, loss, schedules, checkpoints; and
dino_step, one optimizer step), ``loop`` (train: the loop over dino_step), ``engine`` (DeepSpeed),
``checkpoint`` (atomic, verified checkpoints) and ``run_lock`` (one trainer per run folder). The
command line is ``ssl_container.train``; the run folder's layout, which export and the launcher read
too, is ``ssl_container.run_folder``."""
