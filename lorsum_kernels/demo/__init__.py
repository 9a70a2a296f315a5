"""Demos.

* ``python -m lorsum_kernels.demo`` (``make demo``): LoRA on all-MiniLM-L6-v2 for BBC News topic
  classification with every optimizer of the package, offline (``minilm.py``); ``--lm`` for SmolLM2-135M
  language modelling on the same text (``smollm.py``).
* ``python -m lorsum_kernels.demo.synthetic`` (``make demo-synthetic``): the deterministic linear task of
  spec/lorsum.md §10.
"""
