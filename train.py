"""Train mm-PT (or one dataset alone): python train.py --config configs/quickstart.yaml"""

import sys

from mmpt.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
