"""What trains: the loop (``loop.train``). The rest of the trainer (run building, step, engine,
checkpoints) still lives at the package root."""
