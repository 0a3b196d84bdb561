"""The main job: prepare MovieLens-100K and stream it through Ray Data (grows into the full pipeline).

    python jobs/main.py --config configs/main_ml100k.yaml
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idle_ray import cli  # noqa: E402
from jobs import prepare  # noqa: E402


def main(argv=None):
    prepare.main(argv)


if __name__ == "__main__":
    cli.run_main(main)
