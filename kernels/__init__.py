"""Fused update kernels for the single-loop methods (installed as ``torchbilevel.kernels``)."""
