# Model families: one folder each (cogvideox/, factorized/, phenaki/), declared in registry.py.
