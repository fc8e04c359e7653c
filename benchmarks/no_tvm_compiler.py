"""Make `import tvm` fail in this process, as on a machine with only the TVM runtime (the GPU machine has no
compiler library). Installed as `sitecustomize.py` by `benchmarks/gpu_check.sh --dry-run`, and run first by
tests/kernels/test_aot.py's child process: the exported kernels must load through tvm_ffi alone.
Standalone (standard library only): it runs before the project is importable."""
import importlib.abc
import importlib.machinery
import sys


class _Blocked(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError(spec.name + " is blocked: this process has no TVM compiler (only the TVM runtime is allowed)")

    def exec_module(self, module):
        pass


class _NoTVMCompiler(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # a spec without origin: torch's probes pass, imports fail
        if name == "tvm" or name.startswith("tvm."):
            return importlib.machinery.ModuleSpec(name, _Blocked())
        return None


sys.meta_path.insert(0, _NoTVMCompiler())
