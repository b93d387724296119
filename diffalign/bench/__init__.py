"""The measuring harness: the toy-world alignment bench and its evaluation (``experiment``), and
statistics for comparing models (``stats``). Everything here times or scores the same ``train()`` and
``sample()`` a user runs."""
