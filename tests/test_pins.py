"""The conda environments pin what pip pins, and every rule's environment holds what its script imports.

Conda's channels cannot be reached from the test machines, so nothing here solves an environment: these
tests read envs/*.yaml, environment.yml, pyproject.toml and the rule files, and compare them.
"""

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "workflow" / "rules"
ENV_FILES = sorted((ROOT / "envs").glob("*.yaml")) + [ROOT / "environment.yml"]
SLURM_REQUIREMENTS = ROOT / "workflow" / "profiles" / "slurm" / "requirements.txt"

# conda-forge name → the pip distribution that pyproject.toml pins; names not listed are the same on both.
CONDA_TO_PIP = {
    "pytorch": "torch",
    "simpleitk": "SimpleITK",
    "matplotlib-base": "matplotlib",
    "seaborn-base": "seaborn",  # seaborn without its optional statsmodels
    "pyyaml": "PyYAML",
    "faiss-gpu": "faiss-cpu",  # one faiss, two builds: pip has the CPU one only
}
CONDA_ONLY = {"python", "cuda-version", "pip"}
# import name → conda packages that provide it; modules not listed are provided by the package of their name.
IMPORT_TO_CONDA = {
    "torch": {"pytorch"},
    "faiss": {"faiss-cpu", "faiss-gpu"},
    "SimpleITK": {"simpleitk"},
    "matplotlib": {"matplotlib-base", "matplotlib"},
    "seaborn": {"seaborn-base", "seaborn"},
    "yaml": {"pyyaml"},
    "PIL": {"pillow"},
    "skimage": {"scikit-image"},
    "sklearn": {"scikit-learn"},
}
# name =version, or name =version=build (a build pattern such as cuda* or cpu*)
CONDA_SPEC = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)\s*=(?P<version>[^=\s]+)(?:=(?P<build>\S+))?")
PIP_SPEC = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)==(?P<version>\S+)")


def conda_pins(env_file: Path) -> dict[str, tuple[str, str | None]]:
    """name → (version, build pattern) of every conda dependency; an unpinned one is an error."""
    pins = {}
    for dependency in yaml.safe_load(env_file.read_text())["dependencies"]:
        if isinstance(dependency, dict) or dependency == "pip":  # the pip: section, and pip itself
            continue
        match = CONDA_SPEC.fullmatch(dependency.strip())
        assert match, f"{env_file.name}: '{dependency}' is not pinned; write it as 'name =X.Y.Z'"
        pins[match["name"]] = (match["version"], match["build"])
    return pins


def pip_section(env_file: Path) -> dict[str, str]:
    pins = {}
    for dependency in yaml.safe_load(env_file.read_text())["dependencies"]:
        if isinstance(dependency, dict):
            for requirement in dependency.get("pip", []):
                match = PIP_SPEC.fullmatch(requirement)
                assert match, f"{env_file.name}: pip requirement '{requirement}' is not pinned with =="
                pins[match["name"]] = match["version"]
    return pins


def pip_pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for requirement in requirements:
        match = PIP_SPEC.fullmatch(requirement.strip())
        assert match, f"'{requirement}' is not pinned with =="
        pins[match["name"]] = match["version"]
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pyproject_pins() -> dict[str, str]:
    project = pyproject()
    extras = [r for requirements in project.get("optional-dependencies", {}).values() for r in requirements]
    return pip_pins(project["dependencies"] + extras)


def slurm_requirements() -> dict[str, str]:
    lines = [line for line in SLURM_REQUIREMENTS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return pip_pins(lines)


def env_variables() -> dict[str, Path]:
    """The conda environments that common.smk names (FOO_ENV = "../../envs/foo.yaml"), as paths."""
    text = (RULES / "common.smk").read_text()
    return {name: (RULES / path).resolve() for name, path in re.findall(r'(?m)^(\w+_ENV)\s*=\s*"([^"]+)"', text)}


def rule_declarations() -> dict[str, dict]:
    """rule name → its conda: value, script: path and whether its resources ask for a GPU."""
    rules = {}
    for smk in sorted(RULES.glob("*.smk")):
        parts = re.split(r"(?m)^rule (\w+):\n", smk.read_text())
        for name, body in zip(parts[1::2], parts[2::2]):
            conda = re.search(r"\n    conda:\n        (.+)\n", body)
            script = re.search(r'\n    script:\n        "([^"]+)"', body)
            resources = re.search(r"\n    resources:\n((?:        .*\n)+)", body)
            rules[name] = {
                "file": smk.name,
                "conda": conda[1].strip() if conda else None,
                "script": (RULES / script[1]).resolve() if script else None,
                "gpu": bool(resources and re.search(r"\bgpu=1\b", resources[1])),
            }
    return rules


def third_party_imports(script: Path) -> set[str]:
    """Top-level modules outside the standard library that `script` imports, following medmem's own
    modules (scripts/medmem/*.py) through every import, at module level or inside a function."""
    package = ROOT / "scripts" / "medmem"
    found, seen, todo = set(), set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: inside medmem
                    base = ["medmem", *(node.module.split(".") if node.module else [])]
                    modules = [".".join(base)] + [".".join([*base, alias.name]) for alias in node.names]
                else:
                    modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                if parts[0] == "medmem":
                    candidate = package.joinpath(*parts[1:]).with_suffix(".py") if len(parts) > 1 else None
                    if candidate is not None and candidate.exists():
                        todo.append(candidate)
                else:
                    found.add(parts[0])
    return found - set(sys.stdlib_module_names) - {"__future__", "medmem"}


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_every_conda_pin_is_the_pip_pin(env_file):
    pins = pyproject_pins()
    mismatches = []
    for name, (version, _) in conda_pins(env_file).items():
        if name in CONDA_ONLY:
            continue
        pip_name = CONDA_TO_PIP.get(name, name)
        if pip_name not in pins:
            mismatches.append(f"{name}: not pinned in pyproject.toml (as {pip_name})")
        elif pins[pip_name] != version:
            mismatches.append(f"{name} ={version} but pyproject.toml has {pip_name}=={pins[pip_name]}")
    assert not mismatches, f"{env_file.name}: " + "; ".join(mismatches)


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_every_environment_is_conda_forge_only_and_its_python_is_one_medmem_supports(env_file):
    assert yaml.safe_load(env_file.read_text())["channels"] == ["conda-forge", "nodefaults"]
    version, _ = conda_pins(env_file)["python"]
    assert f"{version}.0" in SpecifierSet(pyproject()["requires-python"]), (env_file.name, version)


def test_the_driver_environment_pins_every_pip_pin():
    driver = {CONDA_TO_PIP.get(name, name) for name in conda_pins(ROOT / "environment.yml")}
    missing = set(pyproject_pins()) - driver
    assert not missing, f"environment.yml lacks {sorted(missing)} (pinned in pyproject.toml)"
    assert pip_section(ROOT / "environment.yml") == slurm_requirements(), (
        "environment.yml's pip: section and workflow/profiles/slurm/requirements.txt pin different plugins")


def test_pytorch_builds_follow_the_rules_devices():
    """GPU rules get the CUDA build with a CUDA version; CPU rules the (smaller) CPU build."""
    envs = env_variables()
    for name, rule in rule_declarations().items():
        if rule["conda"] not in envs:
            continue  # reported by the next test
        pins = conda_pins(envs[rule["conda"]])
        build = pins["pytorch"][1]
        if rule["gpu"]:
            assert build == "cuda*" and "cuda-version" in pins, (
                f"GPU rule {name}: {rule['conda']} needs pytorch =X=cuda* and a cuda-version")
        else:
            assert build == "cpu*", f"CPU rule {name}: {rule['conda']} pins pytorch's build {build}, expected cpu*"


def test_every_rule_has_a_conda_environment_that_holds_what_its_script_imports():
    envs = env_variables()
    rules = rule_declarations()
    assert len(rules) >= 15, sorted(rules)
    problems = []
    for name, rule in rules.items():
        if rule["conda"] is None:
            problems.append(f"{rule['file']}: rule {name} has no conda:")
            continue
        if rule["conda"] not in envs or not envs[rule["conda"]].exists():
            problems.append(f"rule {name}: conda: {rule['conda']} is not an envs/*.yaml named in common.smk")
            continue
        # Snakemake puts a rule script's own folder on sys.path: scripts/medmem imports beside scripts/*.py,
        # in any environment, without installing medmem there.
        assert rule["script"] is not None and rule["script"].parent == ROOT / "scripts", (name, rule["script"])
        packages = set(conda_pins(envs[rule["conda"]]))
        for module in sorted(third_party_imports(rule["script"])):
            if not IMPORT_TO_CONDA.get(module, {module.lower()}) & packages:
                problems.append(f"rule {name} imports {module}, which {envs[rule['conda']].name} does not provide")
    assert not problems, "\n".join(problems)


def test_the_import_scan_follows_medmem_modules():
    """Guards the scan above: the similarity rule reaches faiss only through medmem.similarity."""
    script = ROOT / "scripts" / "similarity.py"
    assert "import faiss" not in script.read_text()
    assert {"faiss", "numpy", "torch"} <= third_party_imports(script)
