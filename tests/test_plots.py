import json
import subprocess
import sys

import pytest

from PIL import Image

NO_TORCH = """
import sys

import pytest
class Block:  # any import of torch fails: the plot command can only read saved files
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
from genbench.cli import main
sys.argv = ["genbench"] + sys.argv[1:]
main()
"""


@pytest.mark.slow
def test_quick_run_rows(quick_run):
    rows = [json.loads(l) for l in (quick_run / "rows.jsonl").read_text().splitlines()]
    # diffusion, cm-cd, cm-ct: 2 step counts each; vae, flow: 1 row; x 2 datasets
    assert len(rows) == 16 and all(r["status"] == "done" for r in rows), [r["error"] for r in rows]
    cd = [r for r in rows if r["model"] == "cm-cd"]
    assert all(r["teacher_train_s"] > 0 for r in cd)
    assert {r["nfe"] for r in rows if r["model"] == "diffusion"} == {1, 4}


@pytest.mark.slow
def test_plot_writes_every_figure_from_saved_data_only(quick_run, tmp_path):
    """The plot command runs with torch made unimportable: it can only read saved run data."""
    out = tmp_path / "fig"
    r = subprocess.run([sys.executable, "-c", NO_TORCH, "plot", str(quick_run), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    names = ["samples.png", "trajectories.png", "one_step_map.png", "frontier.png", "losses.png"]
    for name in names:
        p = out / name
        assert p.exists() and p.stat().st_size > 10_000, name
        w, h = Image.open(p).size
        assert w > 300 and h > 200
    md = (out / "report.md").read_text()
    for name in names:
        assert f"]({name})" in md  # embedded with a relative path
    assert "| diffusion" in md


def test_plot_skips_what_a_run_lacks(cli, tmp_path):
    out = tmp_path / "run"
    assert cli("run", "--models", "gauss", "--n-samples", "200", "--out", str(out)).returncode == 0
    r = cli("plot", str(out))
    assert r.returncode == 0, r.stderr
    assert "skipped trajectories.png" in r.stderr and "skipped one_step_map.png" in r.stderr
    assert (out / "report" / "samples.png").exists() and not (out / "report" / "trajectories.png").exists()
    # the single-pass model's panel is drawn (it was blank under pandas 3): a scatter of 200 samples
    # over 200 reference points darkens far more of the figure than the title alone
    import numpy as np

    pixels = np.asarray(Image.open(out / "report" / "samples.png").convert("L"))
    assert (pixels < 200).mean() > 0.01, (pixels < 200).mean()
    # one dataset: the figure is one panel wide, and its wrapped title must not run off either side
    top = pixels[: pixels.shape[0] // 6]
    assert (top < 200).any(), "no title drawn"
    assert (top[:, :3] >= 250).all() and (top[:, -3:] >= 250).all(), "the title is clipped at the figure's edge"


def test_a_plugin_appears_in_the_figures_its_capabilities_fit(cli, tmp_path):
    """No figure knows a model's name: a plugin with trajectory_sample gets the trajectories figure,
    and its declared colour is the one drawn."""
    import numpy as np

    out = tmp_path / "run"
    assert cli("run", "--models", "gauss-paths", "--n-samples", "200", "--floor-draws", "2", "--out", str(out)).returncode == 0
    r = cli("plot", str(out))
    assert r.returncode == 0, r.stderr
    assert "skipped trajectories.png" not in r.stderr and (out / "report" / "trajectories.png").exists()
    rgb = np.asarray(Image.open(out / "report" / "samples.png").convert("RGB")).astype(int)
    magenta = (rgb[..., 0] > 200) & (rgb[..., 1] < 120) & (rgb[..., 2] > 200)
    assert magenta.sum() > 50, magenta.sum()
    listed = cli("list", timeout=120).stdout
    assert "trajectory" in listed and "multistep, trajectory" in listed  # capabilities column


def _figures_of(run_dir):
    from genbench import plots, report, store

    rd = store.RunDir(run_dir)
    return plots.figures(rd, report.tidy(rd.rows()), notice=lambda m: None)


def _panels(fig) -> int:
    return sum(ax.get_visible() and ax.axison for ax in fig.axes)


def test_figures_are_small_multiples_with_every_text_inside(cli, tmp_path):
    """One dataset and six (model, steps) cells: the samples figure is a grid, not a strip; every
    figure keeps its titles, labels and legends on the canvas."""
    import matplotlib.pyplot as plt

    from genbench import plots

    one = tmp_path / "one"
    assert cli("run", "--models", "gauss,gauss-paths", "--n-samples", "200", "--floor-draws", "2",
               "--out", str(one)).returncode == 0
    two = tmp_path / "two"
    assert cli("run", "--models", "gauss,gauss-paths", "--datasets", "ring8,moons,circles,pinwheel",
               "--n-samples", "200", "--floor-draws", "2", "--out", str(two)).returncode == 0
    for run_dir in (one, two):
        figs = _figures_of(run_dir)
        assert {"samples.png", "trajectories.png", "frontier.png"} <= set(figs)
        for name, fig in figs.items():
            assert plots.text_outside(fig) == [], (run_dir.name, name, plots.text_outside(fig))
            w, h = fig.get_size_inches()
            assert 0.4 <= w / h <= 4, (name, w, h)  # never one long row or column
            plt.close(fig)
    figs = _figures_of(two)
    assert _panels(figs["frontier.png"]) == 4 and figs["frontier.png"].get_size_inches()[0] < 13  # 3 columns, 2 rows
    legend = [t.get_text() for lg in figs["frontier.png"].legends for t in lg.get_texts()]
    assert any("one point, NFE 1" in t for t in legend), legend  # a single step count is said, not drawn as a line


def test_the_text_check_sees_a_clipped_title():
    import matplotlib.pyplot as plt

    from genbench import plots

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_title("a title far too long for a figure two inches wide, running off both of its edges")
    assert plots.text_outside(fig)
    plt.close(fig)


def test_no_panel_title_is_drawn_over_another_panel():
    """Equal-aspect panels on two rows with two-line titles, as the samples figure draws them for
    one dataset and six models: after _finish no title overlaps another panel."""
    import numpy as np

    from genbench import plots

    fig, flat = plots._grid(6, max_cols=4, w=2.9, h=3.3)
    for i, ax in enumerate(flat):
        ax.scatter(np.random.default_rng(i).normal(size=(200, 2))[:, 0], np.zeros(200), s=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlim(-3, 3), ax.set_ylim(-3, 3), ax.set_aspect("equal")
        ax.set_title(f"model {i} (1 step)\nW2 0.263 (floor 0.28), 8/8 modes", fontsize=7)
    plots._finish(fig, "Samples (colour) over true data (grey) on ring8, seed 0")
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    for ax in flat:
        title = ax.title.get_window_extent(r)
        for other in flat:
            if other is not ax:
                assert not title.overlaps(other.get_window_extent(r)), (ax.get_title(), other.get_title())


def test_a_long_legend_under_one_panel_does_not_flatten_it():
    """One panel (one dataset, the default run) and seven legend rows below it: the figure grows by
    the legend's rows, so the panel keeps most of the height it was given (it was squeezed to a
    strip when the legend took its room)."""
    from genbench import plots

    fig, flat = plots._grid(1, max_cols=3, w=3.8, h=3.4)
    lines = [flat[0].plot([1, 10], [0.3, 0.4], label=f"model {i}: one point, NFE 1")[0] for i in range(7)]
    plots._finish(fig, "Sample quality against network evaluations (both axes log)",
                  legend=(lines, [ln.get_label() for ln in lines]))
    fig.canvas.draw()
    height = flat[0].get_window_extent(fig.canvas.get_renderer()).height / fig.dpi
    assert height > 0.5 * 3.4, height
