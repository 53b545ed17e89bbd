//! Benchmarks: criterion benches in benches/, whole-system scripts beside them.
