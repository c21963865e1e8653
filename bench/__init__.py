"""The speed suite (`pytest bench/ --benchmark`), the GPU check and the kernel report (bench/NOTES.md); a package,
so that its modules import one another as bench.cases, bench.measure, ... from the repository root."""
