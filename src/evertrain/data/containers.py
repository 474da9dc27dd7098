"""Containers: the files datasets come in, read one record at a time without loading the file into memory.

CONTRACT (to be implemented):

    ACCEPTED = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".parquet", ".csv", ".tsv")

    class ContainerError(ValueError)        a whole-file problem, message without the path (the caller adds it)
    class BadRecord                          a per-record problem: BadRecord(reason: str)
    def kind_of(path) -> str | None          "jsonl" | "jsonl.gz" | "jsonl.zst" | "json" | "parquet" | "csv" | "tsv"
    def accepted_text() -> str               ".jsonl, .jsonl.gz, ..." for messages
    def open_records(path) -> Records        Records: iterable of (index, value); .unit ("line" | "item" | "row");
                                             .fraction() -> float, share of the file's bytes consumed so far
"""
