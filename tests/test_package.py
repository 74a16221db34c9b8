"""Issue 9.1: one import name.  The built wheel holds only `sftgo/...` (no top-level pipeline,
grouping or trainer module), and the installed code imports as sftgo.* from outside the repo,
where neither another wheel's `trainer` nor a user's own `trainer.py` can shadow it; and
issue 9.2: the layers import one way (core <- grouping <- pipeline; core <- trainer)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
        cwd=out,
    )
    wheels = list(out.glob("sftgo-*.whl"))
    assert len(wheels) == 1
    unpacked = out / "site"
    with zipfile.ZipFile(wheels[0]) as zf:
        names = zf.namelist()
        zf.extractall(unpacked)
    (out / "names.txt").write_text("\n".join(names))
    return out


def test_wheel_has_only_the_sftgo_package(wheel_dir):
    names = (wheel_dir / "names.txt").read_text().splitlines()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"sftgo", "sftgo-0.1.0.dist-info"}, tops
    for module in (
        "sftgo/pipeline/cli.py",
        "sftgo/trainer/cli.py",
        "sftgo/grouping/registry.py",
        "sftgo/core/shards.py",
    ):
        assert module in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(next(wheel_dir.glob("*.whl"))).read(entry_points).decode()
    assert "sftgo.pipeline.cli:main" in text and "sftgo.trainer.cli:main" in text


def test_installed_code_imports_as_sftgo_outside_the_repo(wheel_dir, tmp_path):
    # a user's own trainer.py / pipeline.py in the working directory must not shadow ours
    for name in ("trainer", "pipeline", "grouping"):
        (tmp_path / f"{name}.py").write_text("raise SystemExit('the user module was imported')\n")
    env = dict(os.environ, PYTHONPATH=str(wheel_dir / "site"))
    code = (
        "import sys, sftgo.trainer.loop, sftgo.pipeline.build, sftgo.grouping.tfidf;"
        "import sftgo.trainer as t; print(t.__file__);"
        "assert not {'trainer', 'pipeline', 'grouping'} & set(sys.modules), sorted(sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(wheel_dir / "site" / "sftgo" / "trainer"))
    proc = subprocess.run(
        [sys.executable, "-m", "sftgo.trainer.cli", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "torchrun" in proc.stdout, proc.stderr


def _imports(folder: Path) -> set[str]:
    """The sftgo layers that the modules of `folder` import."""
    found = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for name in names:
                parts = name.split(".")
                if parts[0] == "sftgo" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_layers_import_one_way():
    assert _imports(ROOT / "sftgo" / "core") <= {"core"}
    assert _imports(ROOT / "grouping") <= {"core", "grouping"}
    assert _imports(ROOT / "trainer") <= {"core", "trainer"}
    assert _imports(ROOT / "pipeline") <= {"core", "grouping", "pipeline"}
