"""Demos.

* ``python -m lorsum_kernels.demo`` (``make demo``): LoRA on all-MiniLM-L6-v2 for BBC News topic
  classification with every optimizer of the package, offline (``minilm.py``); ``--lm`` for SmolLM2-135M
  language modelling on the same text (``smollm.py``). What the two share (run configuration, the timed
  training loop, the per-run process, the table and the figure) is in ``runner.py``; ``__main__.py`` is the
  command line above both.
* ``python -m lorsum_kernels.demo.synthetic`` (``make demo-synthetic``): the deterministic linear task of
  spec/lorsum.md §10.
"""
