"""Human review in Label Studio; reads prediction files, never imports a model.

Modules and what they import: ``labeling_config`` (the XML config, task validation) and ``brush``
(brush RLE) import nothing of review; ``client`` (the server: push, pull) imports both; ``sources``
(prediction files as review sources, ``--min-score``) imports nothing of review; ``export``
(sources -> tasks, review queue) imports all four; ``reviewed`` (reviewed export -> COCO)
imports ``labeling_config`` and ``brush``. No cycles, counting imports inside functions.
"""
