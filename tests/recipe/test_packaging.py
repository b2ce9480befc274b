"""The built package ships configs/ and recipes/, and an installed rlora finds them without the
checkout: the wheel is built offline from a copy of the source tree and installed into a folder
(about 5 s: pip builds and installs, no network)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

from conftest import REPO

from rlora_cli.adapters import METHODS

SOURCES = ("pyproject.toml", "README.md", "rlora_cli", "configs", "recipes")
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
# What the installed copy reports, run from a folder with no checkout above it.
PROBE = """
import json, rlora_cli
from rlora_cli.recipe.load import adapter_preset, configs_dir, load_recipe, recipes_dir
from rlora_cli.starter import write_starter
recipe = load_recipe(write_starter("starter.yaml", method="hydralora"))
print(json.dumps({"package": rlora_cli.__file__, "configs": str(configs_dir()), "recipes": str(recipes_dir()),
                  "recipe_files": sorted(p.name for p in recipes_dir().glob("*.yaml")),
                  "preset_r": adapter_preset("lora")["r"], "starter_heads": recipe.adapter.num_heads}))
"""


def test_the_wheel_ships_configs_and_recipes_and_the_installed_code_finds_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: the build's own folders (build/, *.egg-info) stay out of the checkout
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "whl"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "whl").glob("rlora-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"rlora_cli/configs/adapters/{m}.yaml" for m in METHODS} <= names
    for folder in ("configs", "recipes"):
        shipped = {f"rlora_cli/{folder}/{p.relative_to(REPO / folder)}"
                   for p in (REPO / folder).rglob("*.yaml")}
        assert shipped and shipped <= names, shipped - names

    site, work = tmp_path / "site", tmp_path / "elsewhere"
    subprocess.run([*PIP, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=work, env=env, check=True, capture_output=True,
                          text=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["package"].startswith(str(site))  # the installed copy, not the checkout
    assert found["configs"] == str(site / "rlora_cli" / "configs")
    assert found["recipes"] == str(site / "rlora_cli" / "recipes")
    assert {"demo.yaml", "mixed.yaml"} <= set(found["recipe_files"])
    assert found["preset_r"] == 8 and found["starter_heads"] == 4  # the lora and hydralora presets
