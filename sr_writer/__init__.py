"""Pure DICOM report builders: (source image datasets, AssessmentResult) → Dataset(s).

- :func:`build_sr`: Comprehensive 3D SR, TID 1500 Measurement Report (the report).
- :func:`parse_sr`: that SR back into an :class:`~inference.result.AssessmentResult`.

No network and no files: the caller writes and sends what these return.
"""

from sr_writer.parse import parse_sr
from sr_writer.tid1500 import build_sr

__all__ = ["build_sr", "parse_sr"]
