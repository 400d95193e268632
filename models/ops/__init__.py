"""Kernels: attention (standard, SDPA, matmul-softmax, tiled online softmax) and the CPU linear."""
