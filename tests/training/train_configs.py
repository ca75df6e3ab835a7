"""Train several configs one after another in one process: `torchrun ... train_configs.py CONFIG [CONFIG ...]`.

The distributed tests' side runs (one per loss, one per BatchNorm setting) share one torchrun job this way, where a
job per config would start torchrun and two workers, each importing torch and timm afresh. The process group is
made by the first run and joined by the next (mmpt.runtime.distributed.init), as each run of train.py would make
its own.
"""

import os
import sys

from mmpt.cli import train_main

MARK = "train_configs.py: "  # opens each config's output (its path follows), so a test can split them

for config in sys.argv[1:]:
    if os.environ.get("RANK", "0") == "0":
        # one process, one write: print() writes the line and its newline apart, so two ranks' marks could interleave
        sys.stdout.write(MARK + config + "\n")
        sys.stdout.flush()
    code = train_main(["--config", config])
    if code:
        sys.exit(code)
