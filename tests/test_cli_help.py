"""Every option of every command says what it does (issue 26 item 4)."""
import argparse

from moestream.cli import build_parser


def _options(parser, name):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub, p in a.choices.items():
                yield from _options(p, f"{name} {sub}")
        elif a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            yield name, a


def test_every_option_has_help():
    options = list(_options(build_parser(), "moestream"))
    assert len(options) > 100
    missing = [f"{name} {'/'.join(a.option_strings)}" for name, a in options if not a.help]
    assert missing == []
    # -q and -v on every command (chat: -v only, its prompt and replies are its output)
    commands = {name for name, _ in options}
    for name in commands:
        flags = {f for n, a in options if n == name for f in a.option_strings}
        assert "-v" in flags and ("-q" in flags or name == "moestream chat"), name
