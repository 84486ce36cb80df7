"""DMT-JEPA: discriminative masked targets for joint-embedding predictive architectures."""

__version__ = "0.1.0"


def from_pretrained(path_or_repo_id, **kwargs):
    """The encoder from an encoder file, a model directory or a Hub repo id (see `dmt_jepa.hub.from_pretrained`)."""
    from dmt_jepa.hub import from_pretrained as load

    return load(path_or_repo_id, **kwargs)
