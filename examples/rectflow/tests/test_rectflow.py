"""The example plugin's own tests: the method works, and genbench runs it as it runs a built-in."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from genbench.datasets import get
from genbench.runner import NFECounter
from genbench_rectflow import RectifiedFlow

torch.set_num_threads(1)  # as genbench's own tests: stable on small shared machines
RING8 = get("ring8")


def test_more_euler_steps_sample_closer_to_the_data():
    """Straight-path training: one Euler step lands between the modes (the mean of the conditional
    paths), more steps bring the samples onto the support; NFE is what the hook counts."""
    model = RectifiedFlow(params={"train_steps": "3000", "batch": "256"})
    info = model.fit(RING8.sample(20_000, [0, 0]), seed=0)
    assert info.steps == 3000 and np.isfinite(info.final_loss) and len(info.losses) == 60
    on = {}
    for k in (1, 32):
        with NFECounter(model.nfe_module) as c:
            x = model.sample(2000, steps=k, seed=1)
        assert c.count == model.nfe(k) == k and not c.undeclared
        on[k] = RING8.on_support(x.numpy()).mean()
    assert on[32] > 0.75 and on[32] > on[1] + 0.5, on


def test_checkpoint_round_trip_gives_the_same_samples():
    model = RectifiedFlow(budget="quick")
    model.fit(RING8.sample(5000, [0, 0]), seed=0)
    again = RectifiedFlow(budget="quick")
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again.sample(100, steps=4, seed=2), model.sample(100, steps=4, seed=2))


@pytest.mark.slow
def test_genbench_runs_the_plugin_with_a_step_sweep_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "genbench.cli", "run", "--models", "rectflow", "--steps", "1,8", "--budget", "quick",
            "--n-samples", "300", "--floor-draws", "2", "--jobs", "1", "--out", str(out)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert sorted(x["nfe"] for x in rows) == [1, 8] and all(x["status"] == "done" for x in rows)
    trained = {x["train_s"] for x in rows}
    (out / "rows.jsonl").unlink()
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {x["train_s"] for x in rows} == trained  # the checkpoint and its fit record were reused
    r = subprocess.run([sys.executable, "-m", "genbench.cli", "plot", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and (out / "report" / "trajectories.png").exists(), r.stderr


def test_side_by_side_fits_are_the_solo_fits_through_the_training_base():
    """The plugin writes no loop: genbench's training base stacks its members (vmapped loss, each
    member's own generator) on the CPU here, and captures the step in a CUDA graph on a GPU."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    datas = [RING8.sample(5000, [s, 0]) for s in (0, 1)]
    for device in devices:
        group = [RectifiedFlow(params={"train_steps": "200"}) for _ in datas]
        infos = RectifiedFlow.fit_side_by_side(group, datas, device=device, seeds=[0, 1])
        assert [i.extras["side_by_side"] for i in infos] == [2, 2]
        for member, info, data, seed in zip(group, infos, datas, (0, 1)):
            solo = RectifiedFlow(params={"train_steps": "200"})
            alone = solo.fit(data, device=device, seed=seed)
            assert info.final_loss == pytest.approx(alone.final_loss, rel=1e-3), device
            torch.testing.assert_close(member.sample(500, steps=8, seed=3), solo.sample(500, steps=8, seed=3),
                                       rtol=1e-3, atol=1e-3)
