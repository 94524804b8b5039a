#!/usr/bin/env python
"""python train.py recipes/sat_lora.yaml [key.sub=value ...] [--resume latest]"""

import sys

from lowmem_vt.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
