"""What users drive: the ``asfda`` command line, the Slicer panel's workflow, and the MRML bridge."""
