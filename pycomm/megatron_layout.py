"""Former home of :mod:`pycomm.megatron.layout`; the same module object, so
``import pycomm.megatron_layout`` keeps working (and stays free of torch)."""

import sys

from pycomm.megatron import layout as _layout

sys.modules[__name__] = _layout
