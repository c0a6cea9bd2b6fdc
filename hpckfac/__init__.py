"""hpckfac: distributed K-FAC natural-gradient training over MPI.

Importing the package never touches a GPU or starts MPI communication; see
``hpckfac.comm.Communicator`` and ``hpckfac.torch.KFACPreconditioner``.
"""
__version__ = "0.1.0"
