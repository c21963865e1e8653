"""The speed suite (pytest-benchmark): `pytest bench/ --benchmark`. A package so that its test modules
(bench.test_models, bench.test_kernels) do not collide with tests/test_models.py in one pytest run."""
