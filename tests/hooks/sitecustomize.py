"""Out-of-memory injection for tests/test_workflow.py (on PYTHONPATH only there).

The first ``mtq.auto_quantize`` call of the run raises ``torch.cuda.OutOfMemoryError``, as a GPU
out of memory at that batch size would; later calls run normally. Each call appends "oom <batch>"
or "ran <batch>" to the file named by VLMSENS_TEST_OOM_RECORD, so the test sees which batch size
each attempt used. ModelOpt is patched when first imported, so the job's import order is unchanged.
"""

import importlib.abc
import importlib.util
import os
import sys

TARGET = "modelopt.torch.quantization"
RECORD = os.environ.get("VLMSENS_TEST_OOM_RECORD")


def _patch(module) -> None:
    real = module.auto_quantize

    def auto_quantize(model, *args, data_loader, **kwargs):
        import torch

        batch = int(data_loader[0]["input_ids"].shape[0])
        first = not os.path.exists(RECORD)
        with open(RECORD, "a") as record:
            record.write(f"{'oom' if first else 'ran'} {batch}\n")
        if first:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return real(model, *args, data_loader=data_loader, **kwargs)

    module.auto_quantize = auto_quantize


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if RECORD:
    sys.meta_path.insert(0, _PatchOnImport())
