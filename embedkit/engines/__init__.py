"""Where embed, segment and patches run: in this process (the default) or on a Ray cluster.

* :mod:`.preprocess` — resize and normalise batches on the encoder's device (CPU or GPU);
* :mod:`.ray_engine` — ``--engine ray``: decoding as Ray Data tasks, the model in an actor pool, every
  worker writing its own shards of the store's resumable run, the driver committing them.

Ray is imported only when the Ray engine is used.
"""

ENGINES = ("local", "ray")
