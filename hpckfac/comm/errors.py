"""The error every rank raises when ranks disagree about a collective."""


class CollectiveMismatchError(RuntimeError):
    """Ranks called a collective with arguments that disagree (lengths, dtypes,
    counts, roots, values passed to ``check_same``).

    Raised on every rank of the communicator, so that no rank is left waiting
    in a collective its peers will never enter. ``same_call`` is True (alike on every
    rank) when every rank is in the same collective of the same call and only the
    arguments differ: the ranks may then exchange more to explain the difference.
    """

    def __init__(self, message: str, same_call: bool = False) -> None:
        super().__init__(message)
        self.same_call = same_call
