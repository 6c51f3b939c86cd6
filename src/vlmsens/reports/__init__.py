"""Pages, tables and plots the workflow writes; :mod:`vlmsens.reports.registry` lists the analyses."""
