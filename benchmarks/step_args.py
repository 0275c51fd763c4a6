"""Command-line options shared by the benchmarks that time (parts of) one DINO step."""
from __future__ import annotations

import argparse


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, images per step and the multi-crop recipe (defaults: the paper's, 4 images), threads."""
    parser.add_argument("--model", default="container_light")
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--n-local", type=int, default=8)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
