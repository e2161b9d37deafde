"""CPU (LLVM) kernels of the csqc TVM target: bit-serial and bit-parallel TensorIR kernels and their packers."""
