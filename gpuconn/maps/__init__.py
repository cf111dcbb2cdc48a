"""Connectivity maps: regions, shared series I/O, seed maps, ROI values, group ICA and dual regression."""

# Sphere radii of the reference study (Kim et al. 2019): 6 mm seeds, 4 mm ROIs. The defaults of --radius and of the
# study file's [[seeds]]/[[rois]] tables; here, free of heavy imports, so the CLI's --help can show them.
#: Default seed sphere radius in mm.
SEED_RADIUS_MM = 6.0
#: Default ROI sphere radius in mm.
ROI_RADIUS_MM = 4.0
