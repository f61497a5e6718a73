"""The Gradio app: Predict, Batch, Similar, History, Unknowns and Model tabs over one ``Service``.

Every tab calls the same ``Service`` methods as the REST API and the CLI; this package only
turns their results into components. ``build_app`` builds the Blocks and starts nothing: the
server mounts it (``imagesieve serve``). Errors reach the user as one line in a toast
(``gr.Error``), never as a traceback; long work (batches, clustering, training) shows progress.
"""

from imagesieve.app.ui._assemble import build_app

__all__ = ["build_app"]
