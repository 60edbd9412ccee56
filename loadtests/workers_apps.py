"""Module-level apps for ``bench_workers.py``.

``clustersess node`` and ``uvicorn --workers`` take an import path of an app, not a
factory; these are ``apps.py``'s benchmark app built once per worker process, configured
from the environment the worker was started with.
"""

from __future__ import annotations

from loadtests.apps import make_clustersess, make_starlette

clustersess = make_clustersess()
starlette = make_starlette()
