"""gpuconn: GPU-accelerated resting-state fMRI connectivity.

Denoising, seed-voxel connectivity, group ICA and dual regression, and
permutation group inference, written once in torch and run on CUDA or CPU.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
