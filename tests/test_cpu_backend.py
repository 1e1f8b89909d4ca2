"""The CPU backend (megatron_exact.platform.cpu): CUDA requests land on the CPU.

Installing the backend is process-wide and irreversible, so every check runs in
a fresh interpreter that reports what it observed as JSON.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

REDIRECTION = r"""
import json, torch
from megatron_exact.platform import setup_platform
from megatron_exact.platform import cpu

facts = {"device_type": setup_platform(), "installed": cpu.is_installed()}
facts["factory_devices"] = [
    str(torch.zeros(2, device="cuda").device),
    str(torch.empty(2, device="cuda:0").device),
    str(torch.ones(2, device=torch.device("cuda", 0)).device),
    str(torch.arange(3, device=0).device),
    str(torch.randn(2, 2, device=torch.cuda.current_device()).device),
]
t = torch.arange(4.0)
facts["cuda_is_identity"] = t.cuda() is t
facts["to_cuda_device"] = str(t.to("cuda").device)
facts["to_cuda_values"] = t.to("cuda").tolist()
facts["type_name"] = t.type()
facts["current_device"] = str(torch.cuda.current_device())

# The "CUDA" generator is the CPU default generator: state round-trips and seeds agree.
state = torch.cuda.get_rng_state()
first = torch.rand(5)
torch.cuda.set_rng_state(state)
facts["rng_round_trip"] = torch.equal(first, torch.rand(5))
facts["rng_state_is_cpu_state"] = torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())
torch.cuda.manual_seed(7)
seeded = torch.rand(3)
torch.manual_seed(7)
facts["manual_seed_is_cpu_seed"] = torch.equal(seeded, torch.rand(3))

# Streams and events exist and do nothing.
stream = torch.cuda.Stream()
event = torch.cuda.Event()
event.record(stream)
stream.wait_event(event)
with torch.cuda.stream(stream):
    pass
torch.cuda.synchronize()
facts["event_query"] = event.query()

# Megatron-Core's tensor-parallel RNG tracker forks the "CUDA" state and restores it afterwards.
from megatron.core import tensor_parallel
tracker = tensor_parallel.get_cuda_rng_tracker()
tracker.add("model-parallel-rng", 1234)
torch.manual_seed(99)
before = torch.get_rng_state()
with tracker.fork():
    forked = torch.rand(4)
facts["fork_restores_default_state"] = torch.equal(before, torch.get_rng_state())
torch.manual_seed(1234)
facts["fork_draws_from_its_seed"] = torch.equal(forked, torch.rand(4))
print("FACTS" + json.dumps(facts))
"""

REFUSAL = r"""
import json, torch
torch.cuda.is_available = lambda: True  # pretend this machine has a GPU
from megatron_exact.platform import cpu, setup_platform

facts = {"setup_platform": setup_platform(), "installed_by_setup": cpu.is_installed()}
try:
    cpu.install()
    facts["install_error"] = None
except RuntimeError as error:
    facts["install_error"] = str(error)
facts["installed"] = cpu.is_installed()
facts["cuda_device_kept"] = str(torch.device("cuda"))
print("FACTS" + json.dumps(facts))
"""


def _run(script):
    # The CPU backend is what is tested: no GPU visible, whatever the machine has.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("FACTS"))
    return json.loads(line[len("FACTS"):])


def test_cuda_requests_land_on_cpu():
    facts = _run(REDIRECTION)
    assert facts["device_type"] == "cpu" and facts["installed"]
    assert facts["factory_devices"] == ["cpu"] * 5
    assert facts["cuda_is_identity"]
    assert facts["to_cuda_device"] == "cpu" and facts["to_cuda_values"] == [0.0, 1.0, 2.0, 3.0]
    # Megatron-Core's gradient clipping checks for this type name.
    assert facts["type_name"] == "torch.cuda.FloatTensor"
    assert facts["current_device"] == "cpu"
    assert facts["rng_round_trip"] and facts["rng_state_is_cpu_state"] and facts["manual_seed_is_cpu_seed"]
    assert facts["event_query"] is True
    assert facts["fork_restores_default_state"] and facts["fork_draws_from_its_seed"]


def test_backend_refuses_to_install_when_cuda_is_available():
    facts = _run(REFUSAL)
    assert facts["setup_platform"] == "cuda"
    assert not facts["installed_by_setup"]
    assert facts["install_error"] is not None and "CUDA" in facts["install_error"]
    assert not facts["installed"]
    assert facts["cuda_device_kept"] == "cuda"
