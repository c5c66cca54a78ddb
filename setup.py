"""beam_infer: offline batch inference with PyTorch as an Apache Beam job that keeps the GPU busy."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
REQUIREMENTS = [line.split("#")[0].strip() for line in (HERE / "requirements.txt").read_text().splitlines()]

setup(
    name="beam_infer",
    version="0.1.0",
    description=__doc__,
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["beam_infer", "beam_infer.*", "pipelines", "pipelines.*"]),
    package_data={"beam_infer.models": ["*.pt"]},
    install_requires=[r for r in REQUIREMENTS if r],
)
