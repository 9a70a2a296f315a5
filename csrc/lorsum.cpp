// The op schemas of lorsum_kernels: the contract between Python and the native kernels.
//
// Every hot-path op is declared here, once, with its schema. The per-device implementations live in
// csrc/cpu/ (TORCH_LIBRARY_IMPL(lorsum, CPU, m)) and csrc/cuda/ (TORCH_LIBRARY_IMPL(lorsum, CUDA, m));
// the fake (meta) implementations used by torch.compile and FakeTensor are registered from Python in
// lorsum_kernels/_native.py. The pure-PyTorch definition of each op is in lorsum_kernels/reference.py,
// and the native kernels are tested against it.
//
// The extension is built with Py_LIMITED_API (see setup.py): this file uses only the stable Python C
// API, and no pybind11, so one `_C.abi3.so` serves every CPython >= 3.10 for a given torch.

#include <Python.h>

#include <torch/library.h>

extern "C" {
// `import lorsum_kernels._C` loads this shared library, which runs the TORCH_LIBRARY /
// TORCH_LIBRARY_IMPL static initialisers below and in the other translation units, registering the ops
// as torch.ops.lorsum.*. The module itself is empty: the ops are reached through torch.ops, which is
// what makes them visible to torch.compile, FakeTensor and opcheck (pytorch/extension-cpp pattern).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name of module
      nullptr,  // no docstring
      -1,  // no per-interpreter state
      nullptr,  // no methods: the ops live in torch.ops.lorsum
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lorsum, m) {
  // Column sums of squares over the token dimension: x (..., T, n) -> (..., n), accumulated and
  // returned in fp32 (fp64 for fp64 input). The diagonal K-FAC statistic of spec/lorsum.md §6.1.
  m.def("col_sq_sums(Tensor x) -> Tensor");
}
