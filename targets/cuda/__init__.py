"""CUDA target of csqc: GPU bit-serial / bit-parallel kernels and glue (TensorIR), device code
compiled ahead of time with nvcc into the artifact (see ``target.py``)."""
