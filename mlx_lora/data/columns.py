"""A training record (Record), and a file's plain records kept as columns (RecordColumns).

Why columns: the garbage collector. A Record is a tuple subclass, so CPython's collector
tracks every one for as long as it lives (it lets go only of exact tuples that hold nothing it
tracks, and never tracks a dict of strings, which is how mlx-lm keeps its records). 100k
Records read from a file are 100k more objects for a full collection to walk, and they set
off one more: two full collections while the file was checked instead of one, 0.1 s of CPU on
100k small records (measured with gc.callbacks on benchmarks/bench_data.py's data; the
tokenizer's imports set off one either way). A file's plain records (data/bulk.py) are
instead kept as they were parsed: a list of strings per field and the line numbers, a handful
of objects to the collector. Each Record, its "FILE:LINE" source included, is built when it
is read, and whoever reads it (tokenizing, the data report) drops it.
"""

from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from operator import add, eq
from typing import NamedTuple


# A NamedTuple, not a frozen dataclass: as immutable, and built in a tenth of the time (a frozen
# dataclass's __init__ took a third of the time of checking a small record).
class Record(NamedTuple):
    """One training record as read; `source` is "FILE:LINE" (just "FILE" for a .txt file)."""

    kind: str  # "text" | "completion" | "chat" | "preference"
    source: str
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: tuple | None = None  # the message dicts as read
    tools: tuple | None = None
    response_start: int = 0  # chat: messages before this index are context, with no loss
    chosen: "Record | None" = None  # preference: the two halves, sharing the prompt
    rejected: "Record | None" = None
    origin: str = ""  # the format it was read in: "chat", "completion", ..., "alpaca"


class RecordColumns(Sequence):
    """A file's records, all of one plain kind (bulk.SHAPES), as a read-only sequence of
    Records built when read; equal to the list of the same Records, as a list would be."""

    __slots__ = ("_kind", "_name", "_numbers", "_columns")

    def __init__(self, kind: str, name: str, numbers: list[int], columns: dict[str, list]):
        """kind's records of file `name`, at lines `numbers`; columns: field -> its values."""
        self._kind, self._name, self._numbers, self._columns = kind, name, numbers, columns

    @property
    def kind(self) -> str:
        """The kind of every record."""
        return self._kind

    def __len__(self) -> int:
        return len(self._numbers)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._rows(lambda values: values[index])
        number = self._numbers[index]  # an IndexError here, as a list raises it
        return Record(kind=self._kind, source=f"{self._name}:{number}", origin=self._kind,
                      **{field: values[index] for field, values in self._columns.items()})

    def __iter__(self) -> Iterator[Record]:
        # Built in C: tuple.__new__ over the zipped columns, in Record's field order.
        given = {"kind": repeat(self._kind), "origin": repeat(self._kind),
                 "source": map(add, repeat(f"{self._name}:"), map(str, self._numbers)),
                 **self._columns}
        fields = [given.get(field, repeat(Record._field_defaults.get(field)))
                  for field in Record._fields]
        # The defaults repeat without end; the columns end the zip.
        return map(tuple.__new__, repeat(Record), zip(*fields, strict=False))

    def __eq__(self, other) -> bool:
        if not isinstance(other, (list, RecordColumns)):
            return NotImplemented
        return len(self) == len(other) and all(map(eq, self, other))

    __hash__ = None  # equal to lists, so unhashable as they are

    def __repr__(self) -> str:
        return repr(list(self))

    def select(self, rows: list[int]) -> "RecordColumns":
        """The records at `rows`, in that order, still as columns."""
        return self._rows(lambda values: list(map(values.__getitem__, rows)))

    def _rows(self, pick) -> "RecordColumns":
        return RecordColumns(self._kind, self._name, pick(self._numbers),
                             {field: pick(values) for field, values in self._columns.items()})


def kinds_of(records: Iterable[Record]) -> set[str]:
    """The records' kinds; columns say theirs without building a record."""
    if isinstance(records, RecordColumns):
        return {records.kind} if records else set()
    return {r.kind for r in records}


def select(records: Sequence[Record], rows: list[int]) -> Sequence[Record]:
    """The records at `rows`, in that order: columns stay columns, a list stays a list."""
    if isinstance(records, RecordColumns):
        return records.select(rows)
    return [records[i] for i in rows]
