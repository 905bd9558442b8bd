"""ASFDALib: the headless engine of ASFDA.

Rank unlabeled target volumes by DKD + ASD with one sliding-window pass each (:mod:`ASFDALib.query.ranking`),
from models loaded safely (:mod:`ASFDALib.models.loading`) and volumes read from NIfTI/NRRD/MetaImage/DICOM
(:mod:`ASFDALib.data.volumes`). No Qt here; ``slicer`` is imported only by the MRML bridge module.
"""

__version__ = "0.1.0"

# seconds between plain progress lines, the command line's and the engine's own (the pseudo-label gates'): often
# enough to show life, rarely enough to read. Here, not in the engine, so the command line can read it without
# importing torch (``asfda --help`` answers at once).
PROGRESS_EVERY_S = 10.0
