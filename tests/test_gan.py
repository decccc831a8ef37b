"""The GAN family (PacGAN packing), PacGAN's datasets and metrics, and its reproduction's table."""
import json
import math

import numpy as np
import pytest
import torch

from genbench import datasets, metrics, report
from genbench.models.gan import GAN, GANNet, GANConfig, pack
from genbench.reproduce import PACGAN

RING = datasets.get("pacgan-ring")
GRID = datasets.get("pacgan-grid")
TINY = {"g_hidden": "16", "g_depth": "2", "d_hidden": "8", "d_depth": "2", "batch": "32"}


def test_the_papers_datasets_are_its_mixtures():
    assert np.allclose(np.linalg.norm(RING.means, axis=1), 1.0) and np.allclose(RING.stds, 0.01) and len(RING.means) == 8
    assert sorted(set(GRID.means[:, 0])) == [-4, -2, 0, 2, 4] and np.allclose(GRID.stds, 0.05) and len(GRID.means) == 25
    x = GRID.sample(20_000, 0)
    assert abs(x.std(0).mean() - math.sqrt(8)) < 0.1  # the grid's per-axis variance: mean of {16, 4, 0, 4, 16}


def test_pacgan_metrics_every_mode_hit_once():
    s = metrics.pacgan_stats(RING.means, RING.means, RING.stds, RING.weights)
    assert s == {"pacgan_modes": 8.0, "pacgan_hq": 1.0, "pacgan_rkl": pytest.approx(0.0, abs=1e-12)}


def test_pacgan_metrics_one_mode_empty_and_the_reverse_kl_of_a_known_histogram():
    x = np.repeat(RING.means[:7], [2, 1, 1, 1, 1, 1, 1], axis=0)  # 8 points over 7 modes, the first twice
    s = metrics.pacgan_stats(x, RING.means, RING.stds, RING.weights)
    p = np.array([2, 1, 1, 1, 1, 1, 1]) / 8
    assert s["pacgan_modes"] == 7 and s["pacgan_hq"] == 1.0
    assert s["pacgan_rkl"] == pytest.approx(float((p * np.log(p * 8)).sum()))  # KL(p || uniform over 8)


def test_pacgan_metrics_the_three_std_threshold():
    mode, std = GRID.means[12], GRID.stds[12]  # (0, 0)
    inside, outside = mode + [2.99 * std, 0], mode + [3.01 * std, 0]
    s = metrics.pacgan_stats(np.stack([inside, outside]), GRID.means, GRID.stds, GRID.weights)
    assert s["pacgan_hq"] == 0.5 and s["pacgan_modes"] == 1  # a mode holds any high-quality sample
    none = metrics.pacgan_stats(np.array([[1.0, 1.0]]), GRID.means, GRID.stds, GRID.weights)  # between modes
    assert none["pacgan_modes"] == 0 and none["pacgan_hq"] == 0 and none["pacgan_rkl"] == math.inf


def test_packing_concatenates_the_ith_point_of_every_slot():
    points = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2)  # 3 slots, 4 examples
    packed = pack(points)
    assert packed.shape == (4, 6)
    for i in range(4):
        assert torch.equal(packed[i], torch.cat([points[0, i], points[1, i], points[2, i]]))


def test_the_discriminator_sees_pack_points_and_each_player_gets_only_its_own_gradient():
    c = GANConfig(pack=3, g_hidden=16, d_hidden=8)
    net = GANNet(c)
    assert net.d_hidden[0].lin.in_features == 6
    real, z = torch.randn(5, 6), torch.randn(3, 5, 2)
    d_loss_only = GANNet.forward  # the sum's gradient, split by player, equals each player's own loss's
    net.zero_grad()
    d_loss_only(net, real, z).backward()
    both = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    fake = pack(net.g(z))
    logits = net.discriminate(torch.cat([real, fake.detach()]))
    (torch.nn.functional.softplus(-logits[:5]).mean() + torch.nn.functional.softplus(logits[5:]).mean()).backward()
    for n, p in net.named_parameters():
        if n.startswith("d"):
            torch.testing.assert_close(both[n], p.grad)  # D's gradient: its own loss's alone
    net.zero_grad()
    fake = pack(net.g(z))
    torch.nn.functional.softplus(-net.discriminate(fake)).mean().backward()
    for n, p in net.named_parameters():
        if n.startswith("g."):
            torch.testing.assert_close(both[n], p.grad)  # G's gradient: the non-saturating loss's alone


def test_side_by_side_members_match_their_solo_fits():
    datas = [RING.sample(4000, [s, 0]) for s in (0, 1)]
    kw = dict(budget="quick", params=TINY | {"train_steps": "5", "pack": "2"})
    group = [GAN(**kw) for _ in datas]
    GAN.fit_side_by_side(group, datas, device="cpu", seeds=[0, 1])
    solo = GAN(**kw)
    solo.fit(datas[1], seed=1)
    for (name, a), b in zip(group[1].net.state_dict().items(), solo.net.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_a_quick_fit_learns_the_ring_and_samples_with_running_statistics():
    data = datasets.get("ring8").sample(20_000, [0, 0])
    model = GAN(budget="quick", params={"train_steps": "800", "g_hidden": "64", "g_depth": "2", "d_hidden": "32",
                                        "d_depth": "2"})
    torch.manual_seed(0)
    model.fit(data, seed=0)
    x = model.sample(2000, seed=1).numpy()
    assert model.net.g.training  # sampling leaves the generator as it found it
    ds = datasets.get("ring8")
    # untrained, the generator puts nothing on the ring; 800 steps put most samples near it
    assert ds.on_support(x).mean() > 0.3 and metrics.mode_stats(x, ds.means, ds.stds, ds.weights)["modes_captured"] >= 4
    again = model.sample(2000, seed=1).numpy()
    assert np.array_equal(x, again)  # eval mode: no batch statistics, no running-statistics update


def test_a_quick_gan_run_resumes_and_plots(cli, tmp_path):
    out = tmp_path / "run"
    args = ("run", "--models", "gan", "--budget", "quick", "--seeds", "0,1", "--n-samples", "300", "--floor-draws", "2",
            *(f for k, v in TINY.items() for f in ("--param", f"gan.{k}={v}")), "--out", str(out))
    r = cli(*args, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {row["model"] for row in rows} == {"gan"} and all(row["nfe"] == 1 for row in rows)
    assert all(row.get("nll") is None and row["nll_note"] for row in rows)
    again = cli(*args, timeout=600)
    assert again.returncode == 0 and "2 of 2 cells were already done" in again.stderr
    plots = cli("plot", str(out), timeout=600)
    assert plots.returncode == 0, plots.stderr
    assert (out / "report" / "samples.png").exists()


def test_the_pacgan_table_marks_only_what_differs_beyond_the_combined_standard_errors():
    def rows(pack, dataset, modes, hq, rkl):
        return [{"model": "gan", "variant": f"pack{pack}", "dataset": dataset, "seed": s, "status": "done",
                 "train_steps": PACGAN.steps(), "pacgan_modes": m, "pacgan_hq": h, "pacgan_rkl": k}
                for s, (m, h, k) in enumerate(zip(modes, hq, rkl))]
    # GAN on the ring: the paper's 6.3 modes; ours 6.0 +- 0.0 (5.9 and 6.1): a difference of 0.3 < 2 x 0.51
    # the grid: ours 10 modes against 17.3 +- 0.8: marked
    df = report.tidy(rows(1, "pacgan-ring", [5.9, 6.1], [0.98, 0.984], [0.4, 0.5])
                     + rows(1, "pacgan-grid", [10, 10], [0.948, 0.948], [0.7, 0.7]))
    text, compared, marked = report.pacgan_table(df, PACGAN, [1])
    assert compared == 6 and marked == 1
    line = next(row for row in text.splitlines() if row.startswith("| GAN"))
    assert line.count(report.MARK) == 1 and "10 ± 0 " + report.MARK in line
    assert "Not the paper's budget" not in text


def test_reproduce_pacgan_runs_end_to_end_and_says_when_the_budget_is_not_the_papers(cli, tmp_path):
    out = tmp_path / "pg"
    r = cli("reproduce", "pacgan", "--packs", "2", "--seeds", "1", "--device", "cpu", "--out", str(out),
            "--param", "gan.train_steps=20", *(f for k, v in TINY.items() for f in ("--param", f"gan.{k}={v}")),
            timeout=600)
    assert r.returncode == 0, r.stderr
    text = (out / "report.md").read_text()
    assert "| PacGAN2" in text and "Not the paper's budget" in text and "PacGAN4" not in text
    rows = [json.loads(line) for line in (out / "pack2" / "rows.jsonl").read_text().splitlines()]
    assert {row["dataset"] for row in rows} == set(PACGAN.datasets.values())
    assert all(row["variant"] == "pack2" and row["pacgan_modes"] is not None for row in rows)
    # another invocation's degrees, trained at once in a run dir of their own beside it: its table
    # has every degree, each from the one run dir that trained it; the first run dir is untouched
    before = (out / "pack2" / "rows.jsonl").read_bytes()
    r = cli("reproduce", "pacgan", "--packs", "3,1", "--seeds", "1", "--device", "cpu", "--out", str(out),
            "--param", "gan.train_steps=20", *(f for k, v in TINY.items() for f in ("--param", f"gan.{k}={v}")),
            timeout=600)
    assert r.returncode == 0, r.stderr
    both = [json.loads(line) for line in (out / "pack1-3" / "rows.jsonl").read_text().splitlines()]
    assert sorted(row["variant"] for row in both) == ["pack1", "pack1", "pack3", "pack3"]
    assert len({row["model"] for row in both}) == 2 and (out / "pack2" / "rows.jsonl").read_bytes() == before
    text = (out / "report.md").read_text()
    assert all(f"| {label}" in text for label in ("GAN", "PacGAN2", "PacGAN3")) and "Rows from pack1-3 and pack2" in text
    # a run of other steps beside them is another table: its rows are not taken
    r = cli("reproduce", "pacgan", "--packs", "1", "--seeds", "1", "--device", "cpu", "--out", str(out),
            "--param", "gan.train_steps=10", *(f for k, v in TINY.items() for f in ("--param", f"gan.{k}={v}")),
            timeout=600)
    assert r.returncode == 0, r.stderr
    text = (out / "report.md").read_text()
    assert "| GAN" in text and "PacGAN2" not in text and "PacGAN3" not in text
    bad = cli("reproduce", "pacgan", "--packs", "0", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and not (tmp_path / "x").exists()
    assert cli("reproduce", "nope").returncode == 2
