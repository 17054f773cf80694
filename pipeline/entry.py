"""The `pipeline` console script: SIGINT / SIGTERM are handled before anything heavy is imported.

The script pip writes imports its target module first and calls it second; pointed at
pipeline.cli:main, a Ctrl-C during those imports (typer, rich, a second or two) ended in a
KeyboardInterrupt traceback. Here the handler is installed first and holds a stop until main()
can report it as the one line (see pipeline.signals).
"""

from __future__ import annotations


def main() -> None:
    from pipeline import signals

    signals.install()
    signals.hold()
    from pipeline.cli import main as cli_main

    cli_main()


if __name__ == "__main__":  # `python -m pipeline.entry ...`: how `pipeline sweep` starts its runs
    main()
