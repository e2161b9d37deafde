"""The top-level library API: names stay what the docs say whatever was imported before."""
import subprocess
import sys


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_api_functions_survive_importing_their_modules():
    # csqc.verify and csqc.capture are both a function and the module that defines it
    out = _run(
        "import csqc.verify, csqc.capture, csqc.cli\n"
        "import csqc, types\n"
        "for name in ('verify', 'capture', 'compile', 'convert', 'load', 'save'):\n"
        "    assert callable(getattr(csqc, name)) and not isinstance(getattr(csqc, name), types.ModuleType), name\n"
        "from csqc.verify import register_artifact_runner\n"
        "print(type(csqc.runtime).__name__)\n"
    )
    assert out == "module"


def test_api_names_are_listed():
    out = _run("import csqc; print(' '.join(sorted(set(csqc.__all__) & {'verify', 'compile', 'capture', 'convert'})))")
    assert out == "capture compile convert verify"
