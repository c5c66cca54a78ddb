"""beam_infer: offline batch inference with PyTorch as an Apache Beam job that keeps the GPU busy."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent


def sections(path: pathlib.Path) -> dict[str, list[str]]:
    """requirements.txt's requirements by section: a line "# Runtime ..." starts "runtime", "# Tests ..." "tests"."""
    found: dict[str, list[str]] = {}
    section = "runtime"
    for line in path.read_text().splitlines():
        if line.startswith("# "):
            section = line[2:].split()[0].lower()
            continue
        requirement = line.split("#")[0].strip()
        if requirement:
            found.setdefault(section, []).append(requirement)
    return found


REQUIREMENTS = sections(HERE / "requirements.txt")

setup(
    name="beam_infer",
    version="0.1.0",
    description=__doc__,
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["beam_infer", "beam_infer.*", "pipelines", "pipelines.*"]),
    package_data={"beam_infer.models": ["*.pt"]},
    install_requires=REQUIREMENTS["runtime"],
    # The worker image installs the runtime alone; a developer's machine `.[dev]`: the tests and the benchmarks.
    extras_require={"test": REQUIREMENTS["tests"], "bench": REQUIREMENTS["benchmarks"],
                    "dev": REQUIREMENTS["tests"] + REQUIREMENTS["benchmarks"]},
)
