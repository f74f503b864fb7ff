"""The package version: the one place it is set (pyproject.toml reads it, setup.py records it in the
build record beside the compiled library, fused_pairloss.__version__ re-exports it)."""
__version__ = "0.1.0"
