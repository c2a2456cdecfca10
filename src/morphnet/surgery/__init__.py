"""Stage 6b: surgery. Rebuild a model with a learned structure, expand / round widths, save and load.

``structure.py`` turns a structure into copies per channel group, ``rebuild.py`` builds
the narrower model, ``expand.py`` scales structures and meets cost targets, ``io.py``
saves and loads slim models without pickles.
"""

from morphnet.surgery.expand import expand_structure, find_width_multiplier, fit_to_budget
from morphnet.surgery.io import load_slim, save_slim
from morphnet.surgery.rebuild import apply_structure

__all__ = ["apply_structure", "expand_structure", "find_width_multiplier", "fit_to_budget", "save_slim", "load_slim"]
