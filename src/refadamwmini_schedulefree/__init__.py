"""Drop-in for the original ``refadamwmini_schedulefree`` module: see :mod:`refadamw.compat`.

``from refadamwmini_schedulefree import RefAdamWminiScheduleFree`` builds
:class:`refadamw.RefAdamWMiniSF`. The original arithmetic is the explicit class
``LegacyRefAdamWminiScheduleFree`` (kohya: ``--optimizer_type
refadamwmini_schedulefree.LegacyRefAdamWminiScheduleFree``); ``legacy=True`` on the
front door still builds one, for old scripts.
"""

from refadamw.compat import LegacyRefAdamWminiScheduleFree, RefAdamWminiScheduleFree

__all__ = ["LegacyRefAdamWminiScheduleFree", "RefAdamWminiScheduleFree"]
