"""Evaluate a run per dataset: python evaluate.py runs/<name> [--split val|test]"""

import sys

from mmpt.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
