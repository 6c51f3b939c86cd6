"""Cross-cell reports: tables and plots a quantization engineer acts on.

One module per analysis, each registered in :mod:`vlmsens.reports.registry` (which
``rules/report.smk`` turns into one rule each):

* ``report``: summary of every cell, most sensitive groups per cell;
* ``sensitivity_plot``: per-group sensitivity of each model in network order;
* (a) ``rank_stability`` across calibration sizes (Kendall τ, Spearman ρ, top-k overlap);
* (b) ``format_comparison``: per-group scores of two formats on the same data;
* (c) ``scope_comparison``: LM-only vs all-layers on the text layers;
* (d) ``towers`` (vision / text / head): score distribution and budget shares;
* (e) ``heatmap``: block index × sublayer type, per cell;
* (f) ``depth_profile``: model families by relative depth (only when the grid holds two families);
* ``recipe_summary``: the re-solved recipes of every budget;
* (g) ``validation_report`` and ``validation_plot``: verdict per cell and predicted score vs
  measured damage (from ``validation.json``);
* "Ship this": ``ship_this``, the groups every cell ranks top (keep in BF16 first) or safe, with the
  evidence per cell, and ``damage_vs_bits``, measured damage of the recipes across a ladder of
  budgets (from ``ladder.json``, rule ``ladder``).

Analyses read ``quant_manifest.json`` (or recipes.json / validation.json / ladder.json) only, never the model
or the .pt state. Each writes data frames as CSV and a :class:`~vlmsens.reports.doc.Doc` as
Markdown and as a small HTML page for ``snakemake --report``, and says "not applicable" with the
reason when the grid lacks what it compares, instead of failing. ``recipes`` and ``validate`` hold
the per-cell pages of the rules of those names.
"""
