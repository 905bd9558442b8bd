"""ASFDALib: the headless engine of ASFDA.

Rank unlabeled target volumes by DKD + ASD with one sliding-window pass each (:mod:`ASFDALib.ranking`),
from models loaded safely (:mod:`ASFDALib.models`) and volumes read from NIfTI/NRRD/MetaImage/DICOM
(:mod:`ASFDALib.volume_io`). No Qt here; ``slicer`` is imported only by the MRML bridge module.
"""

__version__ = "0.1.0"
