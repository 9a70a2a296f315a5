"""Demos: ``python -m lorsum_kernels.demo.synthetic`` (the deterministic linear task of spec/lorsum.md §10)."""
