"""Parameters and GMACs (torch.utils.flop_counter FLOPs / 2, one image) of the Container family.

    python benchmarks/model_flops.py [--sizes 224 96] [--models container_light container container_pam]

Prints one JSON object per model: backbone parameters (num_classes=0) and GMACs per input size.
"""
from __future__ import annotations

import argparse
import json

from ssl_container.models.info import describe

MODELS = ("container_light", "container", "container_pam", "container_light_narrow")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 96])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    for name in args.models:
        print(json.dumps(describe(name, args.sizes)), flush=True)


if __name__ == "__main__":
    main()
