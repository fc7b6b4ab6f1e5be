"""Builders of tiny and random-weight teachers for tests and benchmarks. The product never imports this package."""
