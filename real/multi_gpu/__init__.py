"""Several GPUs: the process group and collectives (``distributed``), and DDP / FSDP
wrapping of the model (``parallel``).  Imports no other package of ``real``."""
