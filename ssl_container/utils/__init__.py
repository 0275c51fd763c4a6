"""Small helpers every layer may use, none of which knows DINO, models or the trainer: atomic file
writes (``files``), progress output (``progress``), config-field checks (``checks``), lazy package
attributes (``lazy``), a backbone's features over a loader (``features``: the one extraction that the
trainer's k-NN monitor and every evaluation use), the CPU process settings (``runtime``: allocator; ``cpu_kernels``: faster
float32 convolution kernels for Container's 1x1 and depthwise convolutions)."""
