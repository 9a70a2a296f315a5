"""What the kernels use from triton.language beyond its builtins, in a form that runs in both modes.

Contract: ``add`` is the combiner to pass to the builtin ``tl.reduce`` for a sum. The kernels use
``tl.reduce(x, axis, add)`` instead of ``tl.sum(x, axis)``, ``tl.full`` instead of ``tl.zeros`` and integer
arithmetic instead of ``tl.cdiv``, because those three are themselves ``@triton.jit`` functions, fixed in
compiled mode when triton is imported without TRITON_INTERPRET=1 (``import torch._dynamo`` imports triton,
so in practice any process that imports this package): the interpreter could not call them. Builtins
are rebound to the interpreter at each launch, and the interpreter recognises this combiner and sums
with numpy. Compiled, ``tl.reduce(x, axis, add)`` is exactly what ``tl.sum`` expands to for fp32/fp64.
"""

import triton.language as tl

add = tl.standard._sum_combine
