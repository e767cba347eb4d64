"""`--help` everywhere: every command and subcommand of `vaeserve` has an example, and every flag says
what it does."""

import argparse

from vaeserve.cli import build_parser


def parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("vaeserve",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


def test_every_command_has_an_example_and_every_flag_help():
    seen = list(parsers(build_parser()))
    assert len(seen) > 20  # train, export, serve, client's RPCs, every bench
    for path, parser in seen:
        assert parser.epilog and "vaeserve" in parser.epilog, " ".join(path)
        undocumented = [action.option_strings or action.dest for action in parser._actions
                        if not isinstance(action, argparse._SubParsersAction) and not action.help]  # fmt: skip
        assert not undocumented, (" ".join(path), undocumented)
