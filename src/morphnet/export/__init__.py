"""Stage 6a: export learned structures (alive counts) as JSON."""

from morphnet.export.exporter import StructureExporter, atomic_write, load_alive_counts, write_json

__all__ = ["StructureExporter", "atomic_write", "load_alive_counts", "write_json"]
