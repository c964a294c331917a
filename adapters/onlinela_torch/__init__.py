"""onlinela_torch: PyTorch adapters for the K-FAC family built on :mod:`onlinela`."""

__all__: list[str] = []
