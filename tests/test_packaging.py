"""Guards of the one `rnnscale` namespace: every package listed, imports point one way,
no bare `import kernels`, and a real (non-editable) `pip install .` works."""

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def pyproject(root: Path = ROOT) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text())


def package_problems(root: Path) -> list[str]:
    """Folders with Python files under a mapped package that pyproject does not list (or that
    lack an __init__.py), and listed packages whose folder is gone."""
    setup = pyproject(root)["tool"]["setuptools"]
    listed, mapping = set(setup["packages"]), setup["package-dir"]
    found = set()
    problems = []
    for package, folder in mapping.items():
        for d in sorted([root / folder, *(root / folder).rglob("*")]):
            if not d.is_dir() or "__pycache__" in d.parts or not any(d.glob("*.py")):
                continue
            name = ".".join([package, *d.relative_to(root / folder).parts])
            found.add(name)
            if not (d / "__init__.py").exists():
                problems.append(f"{d.relative_to(root)} has Python files but no __init__.py")
    problems += [f"{n} is not listed in [tool.setuptools] packages" for n in sorted(found - listed)]
    problems += [f"{n} is listed but has no folder" for n in sorted(listed - found)]
    return problems


def test_every_package_folder_is_listed():
    assert package_problems(ROOT) == []


def test_the_package_guard_catches_a_missing_folder(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for folder in pyproject()["tool"]["setuptools"]["package-dir"].values():
        shutil.copytree(
            ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    new = tmp_path / "kernels" / "newfamily"
    new.mkdir()
    (new / "__init__.py").write_text("")
    (tmp_path / "train" / "loose").mkdir()
    (tmp_path / "train" / "loose" / "x.py").write_text("")
    assert package_problems(tmp_path) == [
        "train/loose has Python files but no __init__.py",
        "rnnscale.kernels.newfamily is not listed in [tool.setuptools] packages",
        "rnnscale.train.loose is not listed in [tool.setuptools] packages",
    ]


def test_import_direction_contract_holds():
    r = subprocess.run([str(BIN / "lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 1 kept, 0 broken" in r.stdout


def test_import_direction_contract_catches_an_upward_import(tmp_path):
    """The same contract, on a copy of the layout (a namespace over five portions) where
    kernels imports train, must break."""
    settings = pyproject()["tool"]["importlinter"]
    contract = settings["contracts"][0]
    rename = lambda s: s.replace("rnnscale", "layercheck")
    for layer in ("launch", "train", "parallel", "data", "kernels"):
        (tmp_path / "layercheck" / layer).mkdir(parents=True)
        (tmp_path / "layercheck" / layer / "__init__.py").write_text("")
    (tmp_path / "layercheck" / "kernels" / "bad.py").write_text("import layercheck.train\n")
    ini = configparser.ConfigParser()
    roots = "\n" + "\n".join(rename(x) for x in settings["root_packages"])
    ini["importlinter"] = {"root_packages": roots}
    ini["importlinter:contract:layers"] = {
        "name": contract["name"],
        "type": contract["type"],
        "layers": "\n" + "\n".join(rename(x) for x in contract["layers"]),
    }
    with open(tmp_path / ".importlinter", "w") as f:
        ini.write(f)
    r = subprocess.run(
        [str(BIN / "lint-imports"), "--config", str(tmp_path / ".importlinter")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "layercheck.kernels.bad -> layercheck.train" in r.stdout


def test_ruff_passes_and_bans_bare_top_level_imports(tmp_path):
    r = subprocess.run([str(BIN / "ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.py"
    bad.write_text("import kernels\nfrom train import run\n\nprint(kernels, run)\n")
    r = subprocess.run(
        [
            str(BIN / "ruff"),
            "check",
            "--no-cache",
            "--config",
            str(ROOT / "pyproject.toml"),
            str(bad),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert r.stdout.count("TID251") == 2, r.stdout
    assert "import it as rnnscale.kernels" in r.stdout


@pytest.mark.slow
def test_pip_install_dot_gives_a_working_install(tmp_path):
    """A real `pip install .` (not editable) into a fresh venv, used from another directory.

    The venv borrows this environment's dependencies through a .pth file so the test installs
    only rnnscale itself (no download of torch); .pth lines add folders without running the
    editable-install hook that lives in them."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "_rnnscale_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import rnnscale.train, rnnscale.kernels, rnnscale.kernels.gla, rnnscale.launch.cli;"
        "import rnnscale.train.model, rnnscale.data.packing;"
        "print(rnnscale.train.__file__)"
    )
    r = subprocess.run([str(py), "-c", probe], cwd=elsewhere, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(site), r.stdout  # the installed copy, not the checkout
    assert (Path(site) / "rnnscale" / "kernels" / "gla" / "README.md").is_file()
    r = subprocess.run(
        [
            str(venv / "bin" / "rnnscale"),
            "config",
            "show",
            str(ROOT / "configs" / "debug_cpu.yaml"),
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "mixer_pattern: [gla, attn]" in r.stdout, r.stderr
