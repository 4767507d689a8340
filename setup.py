"""Maps the top-level folders onto the k2serve namespace (pyproject.toml holds everything else)."""
from setuptools import find_packages, setup

FOLDERS = {"k2serve": "k2serve", "k2serve.operator": "operator", "k2serve.worker": "worker", "k2serve.router": "router"}

packages: list[str] = []
for name, folder in FOLDERS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=FOLDERS,
    # models/*/*: the shipped builtin:tiny-k2-agent checkpoint and tokenizer (k2serve/k2format/models)
    package_data={"": ["*.json", "*.jinja", "*.proto", "*.yaml", "py.typed", "models/*/*"]},
)
