"""Drop-in for the original ``adamwmini_schedulefree`` module: see :mod:`refadamw.compat`.

``from adamwmini_schedulefree import AdamWminiScheduleFree`` builds
:class:`refadamw.AdamWMiniSF` (``legacy=True``: the original arithmetic).
"""

from refadamw.compat import AdamWminiScheduleFree

__all__ = ["AdamWminiScheduleFree"]
