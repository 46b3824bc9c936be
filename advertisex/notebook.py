"""What the notebooks share: where the lake is and where their figures go, the same on Databricks
(a ``lake`` widget, figures displayed) and locally (``ADVX_LAKE``, figures saved under ``ADVX_FIGURES``)."""
from __future__ import annotations

import os

ON_DATABRICKS = "DATABRICKS_RUNTIME_VERSION" in os.environ


def lake_root(notebook_globals: dict) -> str:
    """The lake's root: the notebook's ``lake`` widget on Databricks, else ``ADVX_LAKE``."""
    dbutils = notebook_globals.get("dbutils")
    if dbutils is not None:
        dbutils.widgets.text("lake", "data/lake")
        return dbutils.widgets.get("lake")
    return os.environ.get("ADVX_LAKE", "data/lake")


class Figures(dict):
    """The notebook's figures by name; ``show`` displays one (Databricks) or saves it as a PNG."""

    def __init__(self, notebook_globals: dict):
        super().__init__()
        self.display = notebook_globals.get("display")
        self.folder = os.environ.get("ADVX_FIGURES", "data/figures")

    def show(self, name: str, fig) -> None:
        self[name] = fig
        if ON_DATABRICKS and self.display is not None:
            self.display(fig)
        else:
            os.makedirs(self.folder, exist_ok=True)
            fig.savefig(os.path.join(self.folder, f"{name}.png"), dpi=90, bbox_inches="tight")
