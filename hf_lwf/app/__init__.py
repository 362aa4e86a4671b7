"""The ``hf-lwf`` command line and what only it uses: the offline demo, run inspection, reports, the built-in
tasks, model loading and learning-data preparation. Library users need none of it: ``from hf_lwf import ...``
gives the plugin."""
