"""csqc.passes (installed from the top-level `passes/` folder)."""
if __name__ != "csqc.passes":  # pragma: no cover - guard against a second copy
    raise ImportError(
        "import this package as csqc.passes (the top-level 'passes' folder is mapped there by pyproject.toml)"
    )
