//! Storage benchmarks (filled in below).

fn main() {}
