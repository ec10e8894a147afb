"""Package discovery for hf-effllm (metadata lives in pyproject.toml).

The top-level ``kernels/`` and ``hub_cards/`` folders are installed as ``hf_effllm.kernels`` and
``hf_effllm.hub_cards``; nothing is installed under the top-level name ``kernels``, which belongs to an
existing library.
"""

from setuptools import find_packages, setup

MAPPED = {"kernels": "hf_effllm.kernels", "hub_cards": "hf_effllm.hub_cards"}

packages = find_packages(include=["hf_effllm", "hf_effllm.*"])
package_dir = {"hf_effllm": "hf_effllm"}
for folder, name in MAPPED.items():
    for sub in find_packages(include=[folder, f"{folder}.*"]):
        full = name + sub[len(folder) :]
        packages.append(full)
        package_dir[full] = sub.replace(".", "/")

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"hf_effllm.hub_cards": ["*.md"], "hf_effllm": ["py.typed"]},
)
