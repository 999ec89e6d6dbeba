"""How an op's implementation is chosen (`seekforge.ops.dispatch`): `ops.backend(...)` and the engine's `kernels`
setting, and seekforge.ops without Triton.

Nothing here launches a Triton kernel or imports one: which ops may run Triton on a device is read from
`triton_runs_on` and `TritonOp.devices`.
"""

import os
import subprocess
import sys

import pytest
import torch

from seekforge import ops
from seekforge.engine.config import EngineConfig
from seekforge.errors import ConfigError
from seekforge.ops.gemv import GEMV
from seekforge.ops.moe import MOE, ROUTE

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def run(code: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("SEEKFORGE_TRITON", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_auto_runs_triton_on_cuda_only_and_torch_nowhere():
    with ops.backend("auto"):
        assert ops.triton_runs_on(CUDA) and not ops.triton_runs_on(CPU)
        with ops.backend("torch"):
            assert not ops.triton_runs_on(CUDA)
        assert ops.triton_runs_on(CUDA)  # restored on exit


@pytest.mark.skipif(torch.cuda.is_available(), reason="entering 'triton' imports the kernels, here interpreted")
def test_triton_takes_the_cpu_under_the_interpreter_only(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ops.backend("triton"):
        assert ops.triton_runs_on(CPU) and ops.triton_runs_on(CUDA)
    assert ops.check_device("triton", CPU) is ops.Backend.TRITON
    monkeypatch.delenv("TRITON_INTERPRET")
    with ops.backend("triton"):
        assert not ops.triton_runs_on(CPU) and ops.triton_runs_on(CUDA)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        ops.check_device("triton", CPU)
    assert ops.check_device("auto", CPU) is ops.Backend.AUTO


def test_a_backend_for_some_ops_leaves_the_others_as_they_were():
    with ops.backend("auto"), ops.backend("torch", ops=["route", "moe"]):
        assert not MOE.devices and not ROUTE.devices and GEMV.devices == ("cuda",)
        with ops.backend("auto", ops=["moe"]):
            assert MOE.devices == ("cuda",) and not ROUTE.devices
        assert not MOE.devices


def test_bad_choices_name_the_problem():
    with pytest.raises(ConfigError, match="kernels must be one of auto, torch, triton; got 'fast'"):
        with ops.backend("fast"):
            pass
    with pytest.raises(ConfigError, match="no op named 'gemm'.*gemv"):
        with ops.backend("torch", ops=["gemm"]):
            pass
    with pytest.raises(ConfigError, match="kernels must be one of"):
        EngineConfig(kernels="fast")
    assert EngineConfig(kernels="torch").kernels == "torch"


def test_seekforge_triton_0_makes_auto_mean_torch():
    code = ("import torch; from seekforge import ops; d = torch.device('cuda', 0)\n"
            "assert not ops.triton_runs_on(d)\n"
            "with ops.backend('auto'): assert not ops.triton_runs_on(d)\n"
            "with ops.backend('torch'): pass\n"
            "print('ok')")
    proc = run(code, SEEKFORGE_TRITON="0")
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert run(code.replace("assert not ops.triton_runs_on(d)\n", "assert ops.triton_runs_on(d)\n", 1)
               .replace("with ops.backend('auto'): assert not", "with ops.backend('auto'): assert")).stdout.strip() == "ok"


def test_ops_import_and_run_without_triton():
    """A CPU install without Triton: seekforge.ops and the engine import, the references run, and asking for Triton
    says what is missing. With Triton installed, importing seekforge.ops does not import it either."""
    code = """
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("no triton here")
sys.meta_path.insert(0, NoTriton())
import torch
from seekforge import ops
from seekforge.engine import LLM
from seekforge.errors import ConfigError
x = torch.randn(2, 9)
assert ops.argmax(x).tolist() == x.argmax(-1).tolist()
with ops.backend("auto"):
    ops.load_triton_kernels()  # finds no kernels to load and says nothing
try:
    with ops.backend("triton"):
        pass
except ConfigError as err:
    print(err)
"""
    proc = run(code)
    assert "kernels='triton' needs Triton" in proc.stdout, proc.stderr[-2000:]
    proc = run("import sys; import seekforge.ops, seekforge.model; print('triton' in sys.modules)")
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]
