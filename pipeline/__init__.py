"""volfilter: millimetre-aware 3-D filtering of NIfTI MRI volumes on CPU or GPU.

Array level: :func:`pipeline.filters.apply_filter`. Image level:
:func:`pipeline.image.filter_image` (nibabel image or path in, nibabel image
out) and :func:`pipeline.image.filter_file` (one load, several filters, atomic
writes with JSON sidecars).
"""

__version__ = "0.1.0"

from .errors import VolfilterError  # noqa: E402
from .filters import FILTERS, apply_filter  # noqa: E402
from .image import filter_file, filter_image  # noqa: E402

__all__ = ["FILTERS", "VolfilterError", "__version__", "apply_filter", "filter_file", "filter_image"]
