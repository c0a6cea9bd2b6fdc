"""The error every rank raises when ranks disagree about a collective."""


class CollectiveMismatchError(RuntimeError):
    """Ranks called a collective with arguments that disagree (lengths, dtypes,
    counts, roots, values passed to ``check_same``).

    Raised on every rank of the communicator, so that no rank is left waiting
    in a collective its peers will never enter.
    """
