"""targets/tvm/macro_lookup.py: TVMScript macros find their parser by walking frames, and the
kernels they build are the ones TVM's own lookup builds."""
import pytest
from tvm.script.parser.core.parser import ScriptMacro

from csqc.targets.llvm import kernels
from csqc.targets.tvm import macro_lookup


def _built_with(lookup, monkeypatch):
    """Two conv kernels' TVMScript, and how many macro expansions asked ``lookup``."""
    seen = []

    def counting(self):
        seen.append(self)
        return lookup(self)

    monkeypatch.setattr(ScriptMacro, "_find_parser_def", counting)
    funcs = [kernels.bitparallel_conv2d((1, 16, 9, 9), (24, 16, 3, 3), 2, 1, 1, 1),
             kernels.bitparallel_conv2d((1, 32, 6, 6), (32, 1, 3, 3), 1, 1, 1, 32)]
    return [f.script() for f in funcs], len(seen)


def test_installed_when_the_kernels_load():
    assert ScriptMacro._find_parser_def is macro_lookup.find_parser
    assert callable(macro_lookup.tvm_lookup) and macro_lookup.tvm_lookup is not macro_lookup.find_parser
    assert macro_lookup.install()  # twice: still TVM's lookup kept, not our own
    assert macro_lookup.tvm_lookup is not macro_lookup.find_parser


def test_kernels_are_the_same_with_tvms_lookup(monkeypatch):
    ours, calls = _built_with(macro_lookup.find_parser, monkeypatch)
    theirs, tvm_calls = _built_with(macro_lookup.tvm_lookup, monkeypatch)
    assert calls == tvm_calls > 0  # the kernels do expand macros
    assert ours == theirs


def test_a_macro_outside_a_parser_is_refused_like_tvm_does():
    from tvm.script import tirx as T

    @T.macro
    def store(buffer, value):
        buffer[0] = value

    for lookup in (macro_lookup.find_parser, macro_lookup.tvm_lookup):
        with pytest.raises(RuntimeError, match="not available"):
            lookup(store)
