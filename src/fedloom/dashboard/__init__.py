"""The live dashboard: a read-only web page for finished and running runs.

``fedloom dashboard RUN_DIR ...`` serves it for run directories (simulations or
deployments, finished or running: the run store is SQLite in WAL mode, readable while a
run writes it) and ``fedloom server --dashboard HOST:PORT`` serves it from the server
process, with the deployment's per-client statuses. :mod:`fedloom.dashboard.data` builds
the snapshots, :mod:`fedloom.dashboard.app` serves them (Starlette + uvicorn, an optional
extra: ``pip install 'fedloom[dashboard]'``); the page's script draws its own SVG charts.
"""
