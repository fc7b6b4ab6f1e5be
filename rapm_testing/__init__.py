"""Builders of tiny and random-weight teachers for tests and benchmarks, and the plain helpers the
tests share (``helpers``). The product never imports this package."""
