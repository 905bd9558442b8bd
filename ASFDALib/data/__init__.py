"""Reading and checking what users bring: volumes (NIfTI, NRRD, MetaImage, DICOM), label maps, and the
network input made from them."""
