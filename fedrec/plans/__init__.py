"""FL plans: a simulation's client computation exported for real clients (``fedrec plan``).

``format.py`` (the plan file), ``export.py`` (``fedrec plan export``), ``runner.py``
(running a plan on a client), ``data.py`` (a client's local data file) and
``deploy.py`` (a loopback deployment over Flower).
"""

from fedrec.plans.format import FORMAT_VERSION, PlanError

__all__ = ["FORMAT_VERSION", "PlanError"]
