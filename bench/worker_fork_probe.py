"""Which import leaves a forked child unable to use the GPU? With no GPU visible (as in the worker
server), imports the modules that ``import <target>`` loads, one at a time in their load order, and
after each forks a child that makes the GPU visible and initialises CUDA; prints the first culprit.

    python bench/worker_fork_probe.py modelopt.torch.opt [GPU]
"""

import importlib
import json
import os
import subprocess
import sys

TARGET = sys.argv[1] if len(sys.argv) > 1 else "modelopt.torch.quantization"
GPU = sys.argv[2] if len(sys.argv) > 2 else "0"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["PYTHONWARNINGS"] = "ignore"
os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"

order = json.loads(subprocess.run(
    [sys.executable, "-c", f"import sys, json; b = list(sys.modules); import {TARGET}; "
     "print(json.dumps([m for m in sys.modules if m not in set(b)]))"],
    capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])


def child_ok() -> bool:
    pid = os.fork()
    if pid == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = GPU
        try:
            import torch

            torch.cuda.init()
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


import torch  # noqa: E402, F401  (known not to poison a fork)
import transformers  # noqa: E402, F401
import triton  # noqa: E402, F401

print(f"{len(order)} modules; child OK before any: {child_ok()}", flush=True)
last_ok, since = "(the start)", []
previous_top = None
for name in order:
    try:
        module = importlib.import_module(name)
    except Exception as err:  # noqa: BLE001
        print(f"  (import {name} failed: {err!r})")
        continue
    since.append(name)
    top = name.split(".")[0]
    native = str(getattr(module, "__file__", "") or "").endswith(".so")
    if top != previous_top or native or name.startswith("modelopt"):
        if not child_ok():
            print(f"CULPRIT between {last_ok} and {name}: {since}", flush=True)
            break
        last_ok, since = name, []
    previous_top = top
else:
    print("no culprit", flush=True)
