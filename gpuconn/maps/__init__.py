"""Connectivity maps: regions, shared series I/O, seed maps, ROI values, group ICA and dual regression."""
