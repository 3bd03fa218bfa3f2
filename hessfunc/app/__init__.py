"""The application layer: ``hessfunc demo``, ``hessfunc analyze``, reports and plots.

Imported lazily by :mod:`hessfunc.cli`, so ``import hessfunc`` stays light.
"""
