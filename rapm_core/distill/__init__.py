"""Stage B: distil a trajectory store's teacher into a few-step LoRA student.

``reference`` (one RAPM iteration as a single loop: read it first), ``config`` (the options),
``method`` (the interface a method implements) with ``rapm`` (and the peers, listed in
``registry``), ``trainer`` (what every method shares), ``run`` (the loop over a run dir),
``student``/``export`` (the LoRA and what a user loads), ``data``/``rng`` (order and randomness
of a run).
"""
