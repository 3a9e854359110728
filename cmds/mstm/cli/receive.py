"""mstm-receive: not built yet (see the project's issues)."""

from __future__ import annotations

import click

from mstm.cli.common import CONTEXT_SETTINGS, common_options, run_command
from mstm.errors import NotImplementedYet


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("args", nargs=-1)
@common_options
def main(args: tuple[str, ...], config_path: object, verbose: int, quiet: bool) -> None:
    """Not built yet: exits 69 (EX_UNAVAILABLE)."""

    def body() -> int:
        raise NotImplementedYet("mstm-receive is not built yet")

    run_command("mstm-receive", body, verbose=verbose, quiet=quiet)
