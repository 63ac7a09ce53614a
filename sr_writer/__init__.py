"""Pure DICOM report builders: (source image datasets, AssessmentResult) → Dataset(s).

- :func:`build_sr`: Comprehensive 3D SR, TID 1500 Measurement Report (the report).
- :func:`build_text_sr`: Basic Text SR companion, the same content in prose.
- :func:`build_pdf`: Encapsulated PDF "quality card" companion.
- :func:`parse_sr`: the SR back into an :class:`~inference.result.AssessmentResult`.

No network and no files: the caller writes and sends what these return.
"""

from sr_writer.parse import parse_sr
from sr_writer.pdf import build_pdf, extract_pdf
from sr_writer.text_sr import build_text_sr
from sr_writer.tid1500 import build_sr

__all__ = ["build_pdf", "build_sr", "build_text_sr", "extract_pdf", "parse_sr"]
