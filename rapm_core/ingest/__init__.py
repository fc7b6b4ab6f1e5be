"""Stage 0: a prompt file becomes a prompt store.

``config`` (the options), ``sources`` (the file formats and their checks), ``split`` (train/eval),
``engine`` (plan and write the store).
"""
