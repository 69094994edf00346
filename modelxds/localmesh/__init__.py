"""A ModelMesh-compatible mesh on one machine, for `make run`, tests and benchmarks."""
