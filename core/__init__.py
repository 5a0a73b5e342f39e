"""The ground floor: what every package may import and what imports none of them. Errors and exit codes
(`errors`), config dataclasses and their command-line options (`config`, `commands`), devices and dtypes (`device`),
atomic writes (`files`) and model references (`refs`)."""
