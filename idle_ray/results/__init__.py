"""How results look: records, per-user comparisons, tables, plots and result files (house rule 13).

Sits above ``config``, ``data``, ``eval``, ``models``, ``llm`` and ``adapter``; ``train``, ``tune``,
``jobs/`` and ``benchmarks/`` use it, and it never imports them.
"""
