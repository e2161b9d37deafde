"""The shared TVM backend of the ``llvm``, ``aarch64`` and ``cuda`` targets.

* :mod:`.backend` -- ``TvmBackend``: what each device provides (kernels, glue, packers, cost model);
* :mod:`.lower` -- the planner: an optimized graph -> PrimFuncs + an execution plan;
* :mod:`.build` -- builds a plan into one library and writes the artifact (format: ``csqc.artifact``);
* :mod:`.geometry` -- convolution shapes shared by every backend's kernels;
* :mod:`.coverage` -- the ops the planner lowers, declared by each TVM target's registry entry.
"""
