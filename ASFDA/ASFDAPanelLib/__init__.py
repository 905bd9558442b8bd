"""Pure helpers of the Slicer panel (no ``slicer``/``qt`` imports), so they are tested outside Slicer.

They sit in a package beside ``ASFDA.py`` because Slicer tries to load every ``*.py`` file in a
scripted-module folder as a module of its own; a package is imported only when asked for.
"""
