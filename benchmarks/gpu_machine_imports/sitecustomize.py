"""Put this folder on PYTHONPATH to refuse the imports the GPU machine cannot make (ray, mlflow,
diffusers are not installed there), so that a CPU smoke run of
run_gpu.sh shows whether a part would import one of them:

    DEVICE=cpu SMOKE=1 PYTHON=.venv/bin/python PYTHONPATH=benchmarks/gpu_machine_imports \
        OUT=/tmp/smoke_out bash benchmarks/run_gpu.sh levers
"""
import sys

ABSENT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "diffusers")


class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT_ON_THE_GPU_MACHINE:
            raise ImportError(f"{name} is not installed on the GPU machine (benchmarks/gpu_machine_imports)")
        return None


sys.meta_path.insert(0, _Refuse())
