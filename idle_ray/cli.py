"""Shared command-line parsing for the jobs: ``--config FILE`` plus ``--set a.b=v`` overrides."""
from __future__ import annotations

import argparse
import os
import sys

from idle_ray.config import ConfigError, ExperimentConfig, field_help, load_config
from idle_ray.data.readers import DataError


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="experiment YAML (configs/*.yaml); defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set data.max_history=20 (repeatable)")
    p.add_argument("--help-config", action="store_true", help="list every config field with its meaning")
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, ExperimentConfig]:
    args = p.parse_args(argv)
    if args.help_config:
        for name, text in field_help():
            print(f"{name:32s} {text}")
        sys.exit(0)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        fail(e)
    return args, cfg


def fail(err: Exception, code: int = 2):
    print(f"error: {err}", file=sys.stderr)
    sys.exit(code)


def run_main(main, argv=None) -> None:
    """Run a job's ``main``; bad config or data -> one clear line on stderr and exit code 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        main(argv)
    except (ConfigError, DataError) as e:
        fail(e)
