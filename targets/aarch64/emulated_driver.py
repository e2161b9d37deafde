"""Runs inside the emulated aarch64 Python (``qemu-aarch64``): serves one artifact over pipes.

Started by ``csqc.targets.aarch64.emulation`` as
``python3.11 emulated_driver.py CSQC_DIR TARGETS_DIR ARTIFACT``; it needs only numpy and the
aarch64 TVM runtime. csqc's source folders are mounted as the packages ``csqc`` and
``csqc.targets`` by path because the aarch64 Python has no csqc installed (and no torch; the
modules ``csqc.runtime`` imports need neither).

Protocol on stdin/stdout, one message each way per call: an 8-byte little-endian length, then
an npz. Request: ``input0..``. Reply: a status byte, then ``output0..`` and ``record/<buffer>``
(every intermediate buffer) on ``K``, or a UTF-8 ``ExceptionType: message`` on ``E``. The
driver exits when stdin closes. Nothing else may be written to stdout.
"""
import importlib.util
import io
import struct
import sys


def mount_package(name, directory):
    spec = importlib.util.spec_from_file_location(name, f"{directory}/__init__.py",
                                                  submodule_search_locations=[directory])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def read_message(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return stream.read(size)


def write_message(stream, status, payload):
    stream.write(status + struct.pack("<Q", len(payload)) + payload)
    stream.flush()


def main():
    csqc_dir, targets_dir, artifact = sys.argv[1:4]
    replies = sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must not corrupt the reply stream
    mount_package("csqc", csqc_dir)
    mount_package("csqc.targets", targets_dir)
    import numpy as np

    from csqc import runtime

    try:
        model = runtime.load(artifact)
    except Exception as e:  # reported through the pipe so the host can raise the same error
        write_message(replies, b"E", f"{type(e).__name__}: {e}".encode())
        return
    write_message(replies, b"K", b"ready")
    while (request := read_message(sys.stdin.buffer)) is not None:
        try:
            with np.load(io.BytesIO(request), allow_pickle=False) as npz:
                inputs = [npz[f"input{i}"] for i in range(sum(f.startswith("input") for f in npz.files))]
                names = [str(n) for n in npz["record_names"]] if "record_names" in npz.files else None
            record = {}
            outputs = model(*inputs, record=record, record_names=names)
            outputs = outputs if isinstance(outputs, list) else [outputs]
            arrays = {f"output{i}": y for i, y in enumerate(outputs)}
            arrays.update({f"record/{name}": v for name, v in record.items()})
            reply = io.BytesIO()
            np.savez(reply, **arrays)
            write_message(replies, b"K", reply.getvalue())
        except Exception as e:
            write_message(replies, b"E", f"{type(e).__name__}: {e}".encode())


if __name__ == "__main__":
    main()
