"""Keyword aliases kept for one release after a public argument was renamed (listed in
docs/layers.md, "Deprecated aliases")."""
from __future__ import annotations

import functools
import warnings
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """Accept ``old=`` for each ``old -> new`` in ``renames``: warn (DeprecationWarning) and pass it
    on as ``new=``; giving both is a TypeError."""
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {new}= and its deprecated alias {old}=")
                    warnings.warn(f"{fn.__name__}(): {old}= is deprecated, use {new}=", DeprecationWarning,
                                  stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
