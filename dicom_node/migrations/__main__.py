"""The Alembic command line for the index, without an alembic.ini:

    python -m dicom_node.migrations current|history|heads|upgrade head|revision -m ... --rev-id ...

Commands that need the database use DICOM_NODE_DATABASE_URL (the node's setting).
"""

from __future__ import annotations

import sys

from alembic.config import CommandLine

from dicom_node.migrations import config


def main(argv: list[str] | None = None) -> None:
    cli = CommandLine(prog="python -m dicom_node.migrations")
    options = cli.parser.parse_args(argv)
    if not hasattr(options, "cmd"):
        cli.parser.error("too few arguments")
    cfg = config()
    cfg.cmd_opts = options
    cli.run_cmd(cfg, options)


if __name__ == "__main__":
    main(sys.argv[1:])
