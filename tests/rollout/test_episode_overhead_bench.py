"""benchmarks/episode_overhead.py on the CPU, tiny: every way runs the same episodes, the engine-side step log comes
back from inside the Ray worker, and the table lists every way."""
import json

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("one_torch_thread")   # main() sets one torch thread; the fixture restores


@pytest.mark.slow
def test_every_way_runs_the_same_decode(tmp_path, capsys):
    from benchmarks.episode_overhead import main
    out = tmp_path / "eo.json"
    main(["--episodes", "4", "--tokens", "6", "--prompt-len", "8", "--repeats", "1", "--no-results",
          "--json", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"engine", "loop", "worker", "pool"}
    for key, (run,) in runs.items():
        assert run["steps"]["steps"] >= 6 and run["steps"]["step_s"] > 0 and run["cpu_s"] > 0, key
        assert run["wall_s"] >= run["steps"]["step_s"], key
    table = capsys.readouterr().out
    assert "RolloutPool.run_episodes_refs" in table and ("identical" in table or "ids 4/4" in table)
