"""The web app (``obliteratus ui``, optional extra ``ui``: Gradio): app.py builds and serves it over the
public Python API, jobs.py runs long work off the request thread. Importing this package imports
nothing; ``obliteratus.ui.app`` needs Gradio."""
