"""rich tables that fit the terminal: long cells and headers fold onto more lines instead of being cut with "…"."""

from rich.table import Table as RichTable


class Table(RichTable):
    def add_column(self, *args, overflow: str = "fold", **kwargs) -> None:
        super().add_column(*args, overflow=overflow, **kwargs)
