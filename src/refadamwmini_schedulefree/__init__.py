"""Drop-in for the original ``refadamwmini_schedulefree`` module: see :mod:`refadamw.compat`.

``from refadamwmini_schedulefree import RefAdamWminiScheduleFree`` builds
:class:`refadamw.RefAdamWMiniSF` (``legacy=True``: the original arithmetic).
"""

from refadamw.compat import RefAdamWminiScheduleFree

__all__ = ["RefAdamWminiScheduleFree"]
