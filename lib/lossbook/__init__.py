"""lossbook: training objectives and optimizers from recent papers, derived and tested.

Each method lives in ``lossbook.<part>.<method>`` (e.g. ``lossbook.classification.comp_sum``), next
to the book chapter that derives it. Shared pieces: :mod:`lossbook.runtime`, :mod:`lossbook.data`,
:mod:`lossbook.models`, :mod:`lossbook.train`, :mod:`lossbook.metrics`, :mod:`lossbook.plot`.
"""
__version__ = "0.1.0"
