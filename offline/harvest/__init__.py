"""Building blocks for turning intercepted cases into training data (issue 11).

Each module is one concept and works on plain records, never on the case store, so the
``guardrail harvest`` command (and a team's own scripts) can chain them:

- :mod:`records`: the UnsafeChain record (``prompt`` + ``<think>`` response + provenance) and
  reading / writing JSON lines;
- :mod:`pairs`: IPO preference pairs in the form TRL's DPOTrainer takes without losing the
  shared reasoning prefix;
- :mod:`funnel`: what every filter returns: kept records and counted removals by reason;
- :mod:`dedupe`, :mod:`decontaminate` (with :mod:`eval_sets`), :mod:`scrub`, :mod:`split`,
  :mod:`mixin`: the filters and the split;
- :mod:`importers`: public sets (UnsafeChain, STAR-1, SafeChain) in the same record form;
- :mod:`correction_cache`: the content-hash cache behind ``guardrail correct``.

Heavy dependencies (datasketch, presidio, datasets, torch) are imported inside the functions that
need them: importing this package costs nothing, and the proxy never imports it.
"""
