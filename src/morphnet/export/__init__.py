"""Stage 6a: export learned structures (alive counts) as JSON."""

from morphnet.export.exporter import StructureExporter, load_alive_counts

__all__ = ["StructureExporter", "load_alive_counts"]
