"""``python -m adapterlab``: the same CLI as the ``adapterlab`` console script.

Launchers start a module, not a console script: ``torchrun --nproc_per_node 2 -m adapterlab train RECIPE.yaml``
and ``accelerate launch -m adapterlab train RECIPE.yaml`` run one process per rank through this file.
"""

from __future__ import annotations

from adapterlab.cli.app import app

if __name__ == "__main__":
    app(prog_name="adapterlab")
