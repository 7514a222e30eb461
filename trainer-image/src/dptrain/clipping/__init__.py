"""Per-example gradient clipping for DP-SGD: book-keeping kernels, and Opacus' modes behind one API.

Public surface (everything else is private):

* :func:`make_private` — wrap a model, optimizer (and criterion) for DP-SGD; the contract is in
  its docstring.
* :func:`choose_clipping_mode` → :class:`ClippingChoice` — what ``clipping="auto"`` picks, and why.
* :class:`PrivateOptimizer` — the flat-buffer noising optimizer (``accumulate()``, ``step()``).
* :class:`BookkeepingClipper` — the kernels' clipper, for use without make_private.
"""

from dptrain.clipping._api import ClippingMode, make_private
from dptrain.clipping._bookkeeping import BookkeepingClipper
from dptrain.clipping._coverage import ClippingChoice, choose_clipping_mode
from dptrain.clipping._optimizer import PrivateOptimizer

__all__ = [
    "BookkeepingClipper",
    "ClippingChoice",
    "ClippingMode",
    "PrivateOptimizer",
    "choose_clipping_mode",
    "make_private",
]
