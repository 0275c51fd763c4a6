"""Launching jobs: Slurm (or this machine) through submitit. Uses the library; the library never
imports this package (``ssl-container launch`` imports it lazily).

    options.py      JobOptions: resources, scheduling, requeue cap -> submitit executor parameters
    job.py          TrainJob / EvalJob: the callables each task runs (distributed env, requeue)
    submit.py       submit_train / submit_sweep / submit_eval / wait, and the `launch` command line
    local_slurm/    a real single-node Slurm cluster (cluster.sh) for the integration tests
"""
