"""ASFDALib: the headless engine of ASFDA.

Rank unlabeled target volumes by DKD + ASD with one sliding-window pass each (:mod:`ASFDALib.query.ranking`),
from models loaded safely (:mod:`ASFDALib.models.loading`) and volumes read from NIfTI/NRRD/MetaImage/DICOM
(:mod:`ASFDALib.data.volumes`). No Qt here; ``slicer`` is imported only by the MRML bridge module.
"""

__version__ = "0.1.0"
