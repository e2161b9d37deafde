"""csqc.targets (installed from the top-level `targets/` folder)."""
if __name__ != "csqc.targets":  # pragma: no cover - guard against a second copy
    raise ImportError(
        "import this package as csqc.targets (the top-level 'targets' folder is mapped there by pyproject.toml)"
    )
