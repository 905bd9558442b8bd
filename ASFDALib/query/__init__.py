"""Which volumes to label: feature statistics, the method's formulas (DKD, ASD), the query strategies,
ranking a folder, its cache and its report."""
