"""Command-line helpers shared by train.py, infer.py and the tools."""

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def explicit_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options written out in `argv` (`--flag value` or `--flag=value`),
    as opposed to those left at their defaults."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return {action.dest for action in parser._actions if given & set(action.option_strings)}
