"""What trains: ``run`` (build_run: the student, the method, engine, schedules, checkpoints; and
train_step, one generic optimizer step), ``loop`` (train: the loop over train_step), ``engine``
(DeepSpeed), ``checkpoint`` (atomic, verified checkpoints), ``resume`` (the resume policy: what a restart
continues and what it refuses), ``run_lock`` (one trainer per run folder), ``metrics`` / ``trackers``
(metrics.jsonl, TensorBoard, MLflow, W&B) and ``knn_monitor`` (the online k-NN during training). What a
step computes is the method's (``ssl_container.methods``); the run folder's layout is
``ssl_container.run_folder``. The command line is ``ssl_container.train``."""
