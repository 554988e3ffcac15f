"""Package layout only (everything else is in pyproject.toml).

The default knowledge files live at the top of the repository, where clinicians review them and
deployments copy them from: `cards/` (card text, links, override reasons, services.json) and
`valuesets/` (FHIR ValueSets).  A wheel ships them inside the package, as the data packages
`cds_service._data.cards` and `cds_service._data.valuesets` (no code in them: setuptools'
`package_dir` maps each to its top-level folder), so `pip install .` gives a service that starts
anywhere.  `cds_service.config` looks there first, then in the source tree (editable installs).
pyproject.toml cannot express this mapping next to an automatic package search, hence this file.
"""

from setuptools import find_packages, setup

DATA_PACKAGES = {"cds_service._data.cards": "cards", "cds_service._data.valuesets": "valuesets"}

setup(
    packages=find_packages(include=["cds_service", "cds_service.*"]) + list(DATA_PACKAGES),
    package_dir=DATA_PACKAGES,
)
