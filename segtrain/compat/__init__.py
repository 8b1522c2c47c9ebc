"""Workarounds for our dependencies, one file per dependency, each with the versions it was checked against.

Nothing else in segtrain patches, subclasses internals of, or calls private functions of a dependency;
``tests/test_compat.py`` fails loudly when an installed version leaves the checked range or an
internal these files rely on changes shape.
"""

from __future__ import annotations

import warnings

__all__ = ["warn_if_untested"]

_warned: set[str] = set()


def warn_if_untested(package: str, version: str, tested: tuple[str, ...]) -> bool:
    """Warn once when ``version`` of ``package`` starts with none of the ``tested`` prefixes; True when it is tested."""
    if any(version.startswith(prefix) for prefix in tested):
        return True
    if package not in _warned:
        _warned.add(package)
        warnings.warn(
            f"{package} {version} is outside the versions segtrain's workarounds were checked with ({', '.join(tested)}); "
            f"see segtrain/compat/ and run tests/test_compat.py",
            stacklevel=3,
        )
    return False
