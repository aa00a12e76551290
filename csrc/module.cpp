// Python module engine._laclip_ext: an empty module whose import loads this library, and with it the operators the
// other translation units register as torch.ops.cnclip.* (the kernels in ops.cpp and int8_ops.cpp, the build and
// CPU-path facts in info_ops.cpp). Only Python.h is included: pybind11 and torch/extension.h cost ~50 s of compile
// time on 2 cores for nothing the engine uses (README "Set-up"). Import it only through engine/ops.py.
#include <Python.h>

#define LACLIP_STR2(x) #x
#define LACLIP_STR(x) LACLIP_STR2(x)
#define LACLIP_CONCAT2(a, b) a##b
#define LACLIP_CONCAT(a, b) LACLIP_CONCAT2(a, b)

static PyModuleDef laclip_module = {
    PyModuleDef_HEAD_INIT, LACLIP_STR(TORCH_EXTENSION_NAME),
    "LACLIP native operators, registered as torch.ops.cnclip.* on import; use engine.ops.", -1, nullptr};

PyMODINIT_FUNC LACLIP_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&laclip_module); }
