"""``rollout.protocol`` and ``rollout.client`` need msgpack and pyzmq alone: a client machine need not install
torch (or numpy, transformers, ray). Checked in a fresh interpreter whose import system refuses those packages."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "numpy", "transformers", "ray", "triton", "safetensors")

PROGRAM = f"""
import sys

class Refuse:
    # A meta-path finder consulted before every other: importing a heavy package raises at once.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError(f"blocked import of {{name!r}} (the client must not need it)")
        return None

sys.meta_path.insert(0, Refuse())
from rollout import client, protocol
from engine.sampling_params import SamplingParams
req = protocol.GenerateRequest(prompt_ids=[1, 2], params=SamplingParams(max_tokens=3, temperature=0.7))
body = protocol.pack(req.to_wire(1))
_, back = protocol.decode_request(protocol.unpack(body, protocol.ProtocolLimits()), protocol.ProtocolLimits())
assert back == req, back
c = client.RolloutClient("tcp://127.0.0.1:1", timeout_s=0.05)
c.close()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
assert loaded == [], loaded
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in ("engine", "rollout")))
"""


def test_protocol_and_client_import_without_torch():
    out = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok"), out.stdout
    assert "rollout.client" in out.stdout and "engine.llm_engine" not in out.stdout


def test_the_finder_does_refuse_torch():
    """The guard itself works (else the test above could not fail): importing the engine facade is refused."""
    program = PROGRAM.split("from rollout import")[0] + "import engine.llm_engine\n"
    out = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode != 0 and "blocked import of 'torch'" in out.stderr, out.stderr[-2000:]
