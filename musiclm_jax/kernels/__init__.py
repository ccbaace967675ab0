"""Compiled kernels that XLA calls as FFI custom calls: `matvec`, the CPU matrix-vector product for decoding."""
