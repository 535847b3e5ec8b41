#!/usr/bin/env python
"""Train the embedded tiny MoE (server/assets/tiny). See server/training/train.py.

    .venv/bin/python scripts/train_tiny.py [--steps 1000] [--threads 1] [--aux-loss-coef 0.01] [--out DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.training.train import main  # noqa: E402

if __name__ == "__main__":
    main()
