"""Exceptions for user errors.

A :class:`GpuconnError` is a problem with the user's input or environment
(a missing file, mismatched grids, a bad design). The CLI prints its message
as one line and exits non-zero, without a traceback. Programming errors stay
ordinary exceptions and keep their tracebacks.

An :class:`OptionError` is a bad option value. The library words it with its
own parameter names (``dim must be at least 1``); the CLI renames each
parameter to the flag the user typed (``--dim``) and the study runner to the
study-file key (``ica.dim``), so there is one message and one place that
checks the value (the stage's options object).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

__all__ = ["GpuconnError", "InputError", "OptionError"]

_PARAM = re.compile(r"\{([A-Za-z_]\w*)\}")


class GpuconnError(Exception):
    """An error the user can fix; its message names the file or option and the fix."""


class InputError(GpuconnError, ValueError):
    """Bad input values: wrong shapes, mismatched affines, NaNs, bad designs."""


class OptionError(InputError):
    """A bad option value, worded with parameter names that callers rename.

    Parameters
    ----------
    template : str
        The message with each parameter written as ``{name}`` (its library
        name), e.g. ``"{dim} must be at least 1, got 0"``.

    Attributes
    ----------
    params : tuple of str
        The parameters the message names, in order of appearance.
    """

    def __init__(self, template: str):
        self.template = template
        self.params = tuple(dict.fromkeys(_PARAM.findall(template)))
        super().__init__(self.named(lambda name: name))

    def named(self, rename: Callable[[str], str]) -> str:
        """The message with every parameter written as ``rename(name)``."""
        return _PARAM.sub(lambda m: rename(m.group(1)), self.template)

    def keyed(self, keys: Mapping[str, str], prefix: str = "") -> OptionError:
        """The same error with the parameters in ``keys`` renamed and ``prefix`` put first.

        The other parameters stay parameters, for the next caller to rename
        (the study runner names its keys, the CLI the flags of the rest).
        """
        return OptionError(prefix + _PARAM.sub(lambda m: keys.get(m.group(1), m.group(0)), self.template))
