"""The jobs behind the entry points: training (and, later, evaluation and export)."""
