"""benchmarks/peer_gpu.py's orchestration on the CPU (our side only: vLLM is not installed here): each workload's
job reaches our engine in its own process and comes back with the exact number of output tokens its prompts and
session plans ask for (ignore_eos), and a bad workload or side name is refused before anything runs."""
import json

import pytest

from benchmarks import peer_gpu


def test_ours_side_runs_every_kind_of_workload_with_the_planned_token_counts(tmp_path):
    out = tmp_path / "peer.json"
    rc = peer_gpu.main(["--tiny", "--sides", "ours", "--only", "w1,mt05", "--json", str(out), "--no-results",
                        "--side-timeout", "240"])
    assert rc == 0
    results = json.loads(out.read_text())
    assert set(results) == {"w1", "mt05"}
    for name, r in results.items():
        assert r["vllm"] == {"error": "not run"}
        ours = r["ours"]
        assert "error" not in ours, (name, ours)
        assert ours["tok_s"] > 0 and ours["wall_s"] > 0 and ours["startup_s"] > 0, name
    args = type("A", (), {"tiny": True, "device": "cpu", "dtype": "float32"})()
    job = peer_gpu.make_job("w1", tmp_path / "m1", args)
    assert results["w1"]["ours"]["output_tokens"] == sum(job["max_tokens"])
    job = peer_gpu.make_job("mt05", tmp_path / "m2", args)
    assert results["mt05"]["ours"]["output_tokens"] == sum(m for p in job["plans"] for _, m in p["turns"])
    assert results["mt05"]["ours"]["recomputed_tokens"] == 0 and results["mt05"]["ours"]["preemptions"] == 0


@pytest.mark.parametrize("argv, field", [(["--only", "w9"], "--only"), (["--sides", "ours,sglang"], "--sides")])
def test_bad_names_are_refused_before_anything_runs(argv, field, capsys, tmp_path):
    with pytest.raises(SystemExit):
        peer_gpu.main(["--tiny", "--json", str(tmp_path / "x.json"), *argv])
    assert field in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
