"""The one exception type the CLI turns into a one-line message and exit code 2."""


class BenchError(Exception):
    """A user-facing error: bad input or an unusable file. The message is one line naming the bad value and
    what is accepted."""


def choice_error(kind: str, value: object, accepted) -> BenchError:
    return BenchError(f"unknown {kind} {value!r}; accepted: {', '.join(sorted(map(str, accepted)))}")
