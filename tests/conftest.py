import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

PLUGIN = '''
import os
import signal
from dataclasses import dataclass
import torch
from genbench.api import FitInfo, Generator


@dataclass
class GaussConfig:
    mode: str = "ok"  # ok | fail | nan | hidden (a second network that nfe_module does not name) | die
    marker: str = ""  # mode die: the fit kills its own process (SIGKILL) while this file exists, removing it


class GaussFit(Generator):
    """Full-covariance Gaussian fitted by moments (a throw-away test plugin)."""

    name = "gauss"
    Config = GaussConfig

    def fit(self, data, *, device="cpu", seed=0, teacher=None):
        if self.config.mode == "fail":
            raise RuntimeError("planned failure")
        if self.config.mode == "die":
            try:  # the removal is the claim: of fits running at once, exactly one dies
                os.remove(self.config.marker)
            except FileNotFoundError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-fit
        x = torch.as_tensor(data, dtype=torch.float64)
        self.lin = torch.nn.Linear(2, 2).double()
        with torch.no_grad():
            self.lin.weight.copy_(torch.linalg.cholesky(torch.cov(x.T)))
            self.lin.bias.copy_(x.mean(0))
        return FitInfo(steps=0, final_loss=0.0, train_s=0.0)

    def sample(self, n, *, steps=None, seed=None):
        g = torch.Generator().manual_seed(seed or 0)
        with torch.no_grad():
            x = self.lin(torch.randn(n, 2, generator=g, dtype=torch.float64))
            if self.config.mode == "hidden":
                x = x + 0 * torch.nn.Linear(2, 2).double()(x)
        return x * float("nan") if self.config.mode == "nan" else x

    def nfe(self, steps=None):
        return 1

    def state_dict(self):
        return {"weight": self.lin.weight.detach().clone(), "bias": self.lin.bias.detach().clone()}

    def load_state_dict(self, state, device="cpu"):
        self.restored = True
        self.lin = torch.nn.Linear(2, 2).double()
        with torch.no_grad():
            self.lin.weight.copy_(state["weight"])
            self.lin.bias.copy_(state["bias"])

    @property
    def nfe_module(self):
        return self.lin


class GaussPaths(GaussFit):
    """The Gaussian with straight noise-to-sample paths: a plugin with the trajectory capability."""

    name = "gauss-paths"
    colour = "#ff00ff"

    def trajectory_sample(self, n, *, steps=None, seed=None):
        g = torch.Generator().manual_seed(seed or 0)
        z = torch.randn(n, 2, generator=g, dtype=torch.float64)
        with torch.no_grad():
            x = self.lin(z)
        return torch.stack([z + (x - z) * t for t in torch.linspace(0, 1, 5, dtype=torch.float64)])

    def evaluate(self, test_data):
        """The exact NLL of the held-out points, and whether this copy of the model was restored
        from its checkpoint (a run with scoring processes evaluates a restored copy there)."""
        gauss = torch.distributions.MultivariateNormal(self.lin.bias.detach(), scale_tril=self.lin.weight.detach())
        nll = -gauss.log_prob(torch.as_tensor(test_data, dtype=torch.float64)).mean()
        return {"nll": float(nll), "restored": float(getattr(self, "restored", False))}


class ExactGaussDenoiser(torch.nn.Module):
    """D(y; t) = E[y | y + t z] = S (S + t^2 I)^-1 y for y ~ N(0, S): the exact PF-ODE denoiser."""

    def __init__(self, cov):
        super().__init__()
        lam, self.u = torch.linalg.eigh(cov)
        self.lam = lam.clamp_min(1e-12)

    def forward(self, y, t):
        w = self.lam / (self.lam + t.reshape(-1, 1) ** 2)  # [n or 1, 2]
        return ((y.double() @ self.u) * w) @ self.u.T


class GaussTeacher(GaussFit):
    """The Gaussian with its exact PF-ODE denoiser: a teacher that is not the built-in diffusion."""

    name = "gauss-teacher"

    def pf_ode_denoiser(self):
        from genbench.api import PFODEDenoiser

        w, b = self.lin.weight.detach(), self.lin.bias.detach()
        cov = w @ w.T
        scale = 0.5 / float(cov.trace() / 2) ** 0.5  # standardised to sd 0.5, as the built-ins
        den = ExactGaussDenoiser(cov * scale**2)
        return PFODEDenoiser(lambda y, t: den(y, t).float(), 0.002, 20.0, 0.5, b.float(), scale)


from genbench.models.consistency import ConsistencyConfig, ConsistencyDistillation  # noqa: E402


@dataclass
class FromScratch(ConsistencyConfig):
    init_from_teacher: bool = False  # the exact teacher has no network to start from


class GaussCD(ConsistencyDistillation):
    """Consistency distillation of the exact Gaussian PF-ODE."""

    name = "cd-gauss"
    teacher = "gauss-teacher"
    Config = FromScratch


class NeedyCD(ConsistencyDistillation):
    """A student whose teacher has no PF-ODE."""

    name = "cd-needy"
    teacher = "gauss"
'''


ODD = '''
import os
from dataclasses import dataclass
from genbench.api import FitInfo, Generator

if os.environ.get("ODDPLUG_MARKER"):  # proves when this module is imported
    open(os.environ["ODDPLUG_MARKER"], "a").close()


@dataclass
class Cfg:
    width: int = 4


class NoDoc(Generator):
    name = "nodoc"
    Config = Cfg

    def fit(self, data, *, device="cpu", seed=0, teacher=None):
        return FitInfo(steps=0, final_loss=0.0, train_s=0.0)

    def sample(self, n, *, steps=None, seed=None):
        raise NotImplementedError

    def nfe(self, steps=None):
        return 1

    @property
    def nfe_module(self):
        return None


class Malformed(NoDoc):
    """Multistep, but says nothing of its default step count."""
    multistep = True
'''


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory) -> Path:
    """A throw-away plugin distribution: a module plus a dist-info with genbench.models entry
    points (one good, one whose import fails), found through PYTHONPATH like any installed one."""
    root = tmp_path_factory.mktemp("plugins")
    (root / "toyplug.py").write_text(PLUGIN)
    (root / "brokenplug.py").write_text("import no_such_module_xyz\n")
    (root / "exitplug.py").write_text("raise SystemExit(7)  # a plugin that ends the process as it is imported\n")
    # what a careless plugin author ships: no docstring, a malformed class, a name another
    # distribution also claims (or a built-in's), and a module with an import-time side effect
    (root / "oddplug.py").write_text(ODD)
    dists = {
        "toyplug": "gauss = toyplug:GaussFit\ngauss-paths = toyplug:GaussPaths\nbroken = brokenplug:Thing\n"
                   "gauss-teacher = toyplug:GaussTeacher\ncd-gauss = toyplug:GaussCD\ncd-needy = toyplug:NeedyCD\n"
                   "quitter = exitplug:Thing\n",
        "oddplug": "nodoc = oddplug:NoDoc\nmalformed = oddplug:Malformed\ntwin = oddplug:NoDoc\n"
                   "vae = oddplug:NoDoc\nnoisy = oddplug:NoDoc\n",
        "otherplug": "twin = toyplug:GaussFit\n",
    }
    for name, eps in dists.items():
        info = root / f"{name}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[genbench.models]\n{eps}")
    return root


@pytest.fixture
def cli(plugin_path, tmp_path, monkeypatch):
    """Runs the genbench CLI in this process (no interpreter start, no torch import per call) with
    the plugin on the path, in tmp_path; returns a CompletedProcess. An exception that the CLI
    would have turned into 'internal error' fails the test with its traceback."""
    monkeypatch.syspath_prepend(str(plugin_path))
    monkeypatch.chdir(tmp_path)
    return in_process(monkeypatch)


def in_process(monkeypatch):
    """A function running the CLI in this process, as ``cli`` describes."""
    from typer.testing import CliRunner

    import genbench.cli as gcli

    for console in (gcli.console, gcli.err):
        monkeypatch.setattr(console, "width", 500)  # tables wide enough that no cell wraps (tests read their text)

    def run(*args, timeout=None):  # timeout: accepted for cli_process's signature, not enforced
        args = [str(a) for a in args]
        r = CliRunner().invoke(gcli.app, args)
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise r.exception
        return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)

    return run


@pytest.fixture
def cli_process(plugin_path, tmp_path):
    """Runs the genbench CLI in a subprocess (what a user gets, signals and process pools
    included) with the plugin on the path; returns CompletedProcess."""

    def run(*args, timeout=600):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]))
        env["COLUMNS"] = "500"  # tables wide enough that no cell wraps (tests read their text)
        return subprocess.run([sys.executable, "-m", "genbench.cli", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One tiny run of every built-in family on ring8 and moons, shared by the tests that read runs."""
    out = tmp_path_factory.mktemp("quick") / "run"
    r = subprocess.run([sys.executable, "-m", "genbench.cli", "run", "--models", "diffusion,cm,vae,flow",
                        "--datasets", "ring8,moons", "--steps", "1,4", "--budget", "quick", "--n-samples", "300",
                        "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return out


def assert_members_are_solo_fits(cls, params: dict | list[dict], sample) -> None:
    """Three members of ``cls`` fitted side by side on the CPU against their solo fits: the same
    loss curve and samples (``sample(model)``), up to the batched arithmetic's rounding. ``params``:
    every member's, or a list of each one's (members that differ in member fields)."""
    import numpy as np

    from genbench import datasets

    seeds = [0, 1, 2]
    each = params if isinstance(params, list) else [params] * len(seeds)
    datas = [datasets.get(n).sample(20000, [s, 0]) for n, s in zip(("ring8", "moons", "grid25"), seeds)]
    group = [cls(params=p) for p in each]
    infos = cls.fit_side_by_side(group, datas, device="cpu", seeds=seeds)
    for member, info, data, seed, p in zip(group, infos, datas, seeds, each, strict=True):
        solo = cls(params=p)
        alone = solo.fit(data, seed=seed)
        np.testing.assert_allclose(info.losses, alone.losses, rtol=1e-4)
        assert info.extras["side_by_side"] == 3
        torch.testing.assert_close(sample(member), sample(solo), rtol=1e-4, atol=1e-4)
