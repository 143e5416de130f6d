//! Benchmarks only: see the `[[bench]]` targets of this package and `BENCHMARKS.md`.
