"""One exported function that runs every step of a plan in order.

The runtime then makes one call into the library per inference instead of one per kernel:
a call from Python into TVM costs 0.15-0.25 us (20 us over ResNet-20's 75 kernel calls, ~4 us
over an LSTM step's 26), a direct call inside the library about 20 ns. The kernels stay
exported one by one: ``csqc.runtime.profile_steps`` times them separately, and the plan's
``steps`` remain the description of what the library computes.

CPU targets only: the call builds each argument's DLTensor on the host stack with a CPU
device, which a CUDA kernel's device check would refuse.

Each step is called through a symbol of its own (``csqc_step<i>``, recorded in ``plan.calls``),
which the link defines as the kernel's entry (``build.py``): the kernels are compiled as
separate modules, side by side, and TVM can call a function of another module by name only
once per module (a second call declares the name again, and LLVM renames it).
"""
from __future__ import annotations

from csqc.artifact import whole_model_arguments

from .lower import Plan

__all__ = ["WHOLE_MODEL_FUNC", "add_whole_model_function", "step_symbol"]

WHOLE_MODEL_FUNC = "csqc_run"
# LLVM's time on the function grows with the square of its parameters (each is unpacked and
# checked): 435 (MobileNetV2) ~1.5 s, ~1,000 ~7 s, MaxViT-T's 2,318 65 s and 2.1 GB. Past this
# the runtime calls the steps one by one (~0.3 us a step, against such a model's milliseconds).
MAX_ARGUMENTS = 1024


def step_symbol(index: int) -> str:
    """The symbol the whole-model function calls step ``index`` through."""
    return f"csqc_step{index}"


def add_whole_model_function(plan: Plan) -> None:
    """Add ``csqc_run(buffers..., planes..., zero_points...)`` to ``plan.funcs`` and describe its
    arguments in ``plan.entry``: every buffer the steps use (first use first), then each layer's
    count of planes to accumulate (the run-time PrecisionBatching setting) and the zero points
    that go with them, as ``steps`` spell them; ``plan.calls`` gets the symbol of each call. None
    for a plan of more than ``MAX_ARGUMENTS``."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as I

    arguments = whole_model_arguments(plan.steps)
    if len(arguments) > MAX_ARGUMENTS:
        return
    buffer_names = [a for a in arguments if isinstance(a, str)]
    plane_layers = [a["planes"] for a in arguments if isinstance(a, dict) and "planes" in a]
    zero_point_layers = [a["zero_point"] for a in arguments if isinstance(a, dict) and "zero_point" in a]
    with IRBuilder() as builder:
        with I.prim_func():
            I.func_name(WHOLE_MODEL_FUNC)
            # opaque handles, passed on as they came: each kernel checks its own tensors (shape,
            # dtype, device); declaring them as buffers here would check them all twice and, for
            # ~150 buffers, triple the build time
            buffers = {name: I.arg(f"b{i}", tirx.Var(f"b{i}", "handle")) for i, name in enumerate(buffer_names)}
            planes = {layer: I.arg(f"planes{i}", tirx.Var(f"planes{i}", "int32")) for i, layer in enumerate(plane_layers)}
            zero_points = {layer: I.arg(f"zero_point{i}", tirx.Var(f"zero_point{i}", "int32"))
                           for i, layer in enumerate(zero_point_layers)}
            for index, step in enumerate(plan.steps):
                I.evaluate(tirx.call_cpacked(step_symbol(index), *(_argument(a, buffers, planes, zero_points)
                                                                   for a in step["args"])))
    plan.funcs[WHOLE_MODEL_FUNC] = builder.get()
    plan.calls = {step_symbol(index): step["func"] for index, step in enumerate(plan.steps)}
    plan.entry = {"func": WHOLE_MODEL_FUNC, "args": arguments}


def _argument(arg, buffers: dict, planes: dict, zero_points: dict):
    from tvm import tirx

    if isinstance(arg, str):
        return buffers[arg]
    if "int" in arg:
        return tirx.IntImm("int32", arg["int"])
    if "zero_point" in arg:
        return zero_points[arg["zero_point"]]
    return planes[arg["planes"]]
