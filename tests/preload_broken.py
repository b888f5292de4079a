"""Preloaded by a test's fork server: fails as Transformer Engine does
without its CUDA libraries, with an error that is not an ImportError."""

raise RuntimeError("this module cannot be imported here")
