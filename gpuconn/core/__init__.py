"""Core: devices and dtypes, NIfTI/TSV I/O, errors, progress bars, BIDS discovery, Dask plumbing."""
