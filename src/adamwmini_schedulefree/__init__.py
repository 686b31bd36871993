"""Drop-in for the original ``adamwmini_schedulefree`` module: see :mod:`refadamw.compat`.

``from adamwmini_schedulefree import AdamWminiScheduleFree`` builds
:class:`refadamw.AdamWMiniSF`. The original arithmetic is the explicit class
``LegacyAdamWminiScheduleFree``; ``legacy=True`` on the front door still builds one.
"""

from refadamw.compat import AdamWminiScheduleFree, LegacyAdamWminiScheduleFree

__all__ = ["AdamWminiScheduleFree", "LegacyAdamWminiScheduleFree"]
