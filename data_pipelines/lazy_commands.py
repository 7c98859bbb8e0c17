"""Subcommands whose options and code load only when that subcommand is chosen.

``latentcell --help`` must start in well under a second, but the commands behind it import
torch, anndata, scipy.stats, mlflow and cell-eval (about 2,900 modules, 2-6 s). argparse
builds every subparser up front, so each package registers its commands here by *reference*
(``"module:function"`` strings): the parser holds only names and one-line help, and the
chosen command's ``add_arguments`` and ``run`` are imported when argparse reaches it (the
``parsers`` action below). argparse has no lazy subparsers of its own, hence this file.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

__all__ = ["CommandParser", "DefaultsHelpFormatter", "lazy_command", "resolve"]

_PENDING = "_latentcell_pending"


def resolve(reference: str):
    """The attribute a ``"module:attribute"`` string names."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _loaded(reference: str | Callable) -> Callable:
    return reference if callable(reference) else resolve(reference)


class _LazySubParsersAction(argparse._SubParsersAction):
    """Completes the chosen subparser (its options and ``func``) just before it parses."""

    def __call__(self, parser, namespace, values, option_string=None):
        chosen = self._name_parser_map.get(values[0])
        pending = getattr(chosen, _PENDING, None)
        if pending is not None:
            setattr(chosen, _PENDING, None)
            add_arguments, run = pending
            if add_arguments is not None:
                _loaded(add_arguments)(chosen)
            if run is not None:
                chosen.set_defaults(func=_loaded(run))
        super().__call__(parser, namespace, values, option_string)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to options that have a default worth saying (argparse's own
    ArgumentDefaultsHelpFormatter also prints "default: None" on required options)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or action.required
            or not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or (isinstance(default, (str, list, tuple)) and not default)
        ):
            return text
        return f"{text} (default: %(default)s)".strip()


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose subparsers may be registered with :func:`lazy_command`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _LazySubParsersAction)


def lazy_command(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    add_arguments: str | Callable | None,
    run: str | Callable | None,
    **parser_kwargs,
) -> argparse.ArgumentParser:
    """Register ``name`` with its help now; its options (``add_arguments(parser)``) and its
    handler (``run(args) -> int``) load only if it is chosen. References are
    ``"module:function"`` strings, or callables for what is already cheap to import."""
    parser_kwargs.setdefault("description", help)
    parser = sub.add_parser(name, help=help, **parser_kwargs)
    setattr(parser, _PENDING, (add_arguments, run))
    return parser
